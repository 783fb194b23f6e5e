# The seed's servers/create.nu: `use servers/create.nu; create-server 'wuji'` creates the
# servers of an infra, here, through the same actions and engine as everything else
# (`provisioning server create --direct`).
export def create-server [infra_name: string]: nothing -> record {
    ^provisioning server create --infra $infra_name --direct --output json | from json
}
