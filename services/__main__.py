from services.runner import main

main()
