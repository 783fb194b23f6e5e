# Local provider: FOR DEVELOPMENT AND TESTS ONLY. Nothing is provisioned;
# each resource is one JSON file under $env.PROVISIONING_DATA_DIR/local:
#   servers/<hostname>.json
#   taskservs/<hostname>--<taskserv>.json
#   clusters/<name>.json
# Writes are atomic (temp file in the same directory, then rename).
# Keys must have passed args.nu check-name before they get here.

# Directory of one kind of record, created when missing.
export def dir [kind: string]: nothing -> string {
    let base = ($env.PROVISIONING_DATA_DIR? | default "")
    if $base == "" { error make {msg: "PROVISIONING_DATA_DIR is not set"} }
    let path = ($base | path join "local" $kind)
    mkdir $path
    $path
}

def file [kind: string, key: string]: nothing -> string {
    dir $kind | path join $"($key).json"
}

# One record, or null when there is none.
export def load [kind: string, key: string]: nothing -> any {
    let path = (file $kind $key)
    if ($path | path exists) { open --raw $path | from json } else { null }
}

# Every record of a kind, sorted by file name.
export def load-all [kind: string]: nothing -> list<any> {
    ls (dir $kind)
    | where type == file and ($it.name | str ends-with ".json")
    | sort-by name
    | each {|f| open --raw $f.name | from json }
}

# Write a record atomically; returns it.
export def store [kind: string, key: string, record: record]: nothing -> record {
    let path = (file $kind $key)
    let tmp = $"($path).tmp-(random uuid)"
    $record | to json | save --force $tmp
    mv --force $tmp $path
    $record
}

# Remove a record; true when there was one.
export def remove [kind: string, key: string]: nothing -> bool {
    let path = (file $kind $key)
    if ($path | path exists) { rm --force $path; true } else { false }
}

# A fake but deterministic private address from the hostname: 10.a.b.c.
export def fake-ip [hostname: string]: nothing -> string {
    let hex = ($hostname | hash md5)
    let octet = {|i| $hex | str substring ($i * 2)..($i * 2 + 1) | into int --radix 16 }
    $"10.(do $octet 0).(do $octet 1).((do $octet 2) mod 254 + 1)"
}
