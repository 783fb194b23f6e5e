# Progress reporting on stdout. The executor reads every line of the form
#   PROGRESS: <0-100> <message>
# as task progress; any other printed line is a log line.

# `progress <percent> <message>`: print one progress line (percent clamped
# to 0..100, message on one line). A module cannot export a command named
# like itself, so it is `main` here and `progress` once imported with
# `use .../progress.nu`.
export def main [percent: int, message: string]: nothing -> nothing {
    let pct = ([0 ([$percent 100] | math min)] | math max)
    let text = ($message | str replace --all --regex '[\r\n]+' ' ')
    print $"PROGRESS: ($pct) ($text)"
}
