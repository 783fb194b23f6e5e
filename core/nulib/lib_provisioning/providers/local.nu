# Local provider: THE DEVELOPMENT PROVIDER, for development, tests and demos.
# Nothing is provisioned; each resource is one JSON file under
# $env.PROVISIONING_DATA_DIR/local:
#   servers/<hostname>.json
#   taskservs/<hostname>--<taskserv>.json
#   clusters/<name>.json
# Writes are atomic (temp file in the same directory, then rename).
# Keys must have passed args.nu check-name before they get here.
#
# servers/ is also the inventory of the servers of every provider created
# through this data directory (servers/mod.nu writes it): a record whose
# `provider` is not "local" stands for a real machine, and the local provider
# leaves it alone.
#
# Provider interface (the same in every providers/<name>.nu, called by
# servers/mod.nu with the action's arguments): create, delete, list, status,
# plan. The store helpers below (dir, load, load-all, store, remove) are used
# by the taskserv and cluster actions too.

use ../progress.nu
use ../simulate.nu [run-steps]
use ../args.nu [check-name check-string check-record now-utc]

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

# A server record of this provider (records written before providers existed have none).
def is-local []: record -> bool {
    ($in.provider? | default "local") == "local"
}

# The record a create would write for these arguments.
def wanted [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let server = (check-record $args.server? "server")
    let hostname = (check-name $server.hostname? "server.hostname")
    {
        hostname: $hostname
        infra: $infra
        plan: (check-string $server.plan? "server.plan" "small")
        zone: (check-string $server.zone? "server.zone" "local-1")
        provider: "local"
        state: "running"
        ip: (fake-ip $hostname)
        labels: (check-record $server.labels? "server.labels")
    }
}

# args: {infra, server: {hostname, plan?, zone?, labels?}, delay_seconds?, fail?, fail_at?}
# Creating an existing server returns it with existed: true.
export def create [args: record]: nothing -> record {
    let record = (wanted $args)
    let hostname = $record.hostname
    let infra = $record.infra

    let existing = (load servers $hostname)
    if $existing != null {
        if $existing.infra != $infra {
            error make {msg: $"server ($hostname) already exists in infra ($existing.infra)"}
        }
        run-steps $args [[percent message]; [10 $"server ($hostname) exists"]]
        progress 100 $"server ($hostname) already running"
        return ($existing | insert existed true)
    }

    run-steps $args [
        [percent message];
        [10 $"validating server ($hostname)"]
        [30 $"allocating ($record.plan) in ($record.zone)"]
        [60 "booting"]
        [90 "configuring"]
    ]
    let saved = (store servers $hostname ($record | insert created_at (now-utc)))
    progress 100 $"server ($hostname) running at ($record.ip)"
    $saved | insert existed false
}

# args: {hostname, infra?, delay_seconds?, fail?, fail_at?}
# Also removes the taskservs installed on the server.
# Deleting a missing server is not an error: deleted: false.
export def delete [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let existing = (load servers $hostname)
    if $existing != null and $args.infra? != null and $existing.infra != $args.infra {
        error make {msg: $"server ($hostname) belongs to infra ($existing.infra), not ($args.infra)"}
    }

    if $existing == null {
        run-steps $args [[percent message]; [10 $"server ($hostname) does not exist"]]
        progress 100 "nothing to delete"
        return {hostname: $hostname, deleted: false}
    }

    run-steps $args [
        [percent message];
        [10 $"validating server ($hostname)"]
        [50 "stopping"]
        [80 "releasing resources"]
    ]
    let taskservs = (load-all taskservs | where server == $hostname)
    for ts in $taskservs { remove taskservs $"($hostname)--($ts.taskserv)" }
    remove servers $hostname
    progress 100 $"server ($hostname) deleted"
    {hostname: $hostname, infra: $existing.infra, deleted: true, taskservs_removed: ($taskservs | get taskserv)}
}

# args: {infra?}. The local servers, of one infra or all.
export def list [args: record]: nothing -> list<record> {
    let infra = ($args.infra? | default null)
    load-all servers
    | where {|s| ($s | is-local) and ($infra == null or $s.infra == $infra) }
}

# args: {hostname}. The server's record, or {state: "absent"}.
export def status [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let existing = (load servers $hostname)
    if $existing == null or not ($existing | is-local) {
        {hostname: $hostname, provider: "local", state: "absent"}
    } else {
        $existing
    }
}

# args: {infra, server: {...}, state?: "present" | "absent"}. Read-only: what a
# create (state present, the default) or a delete (absent) would change.
# -> {change: create | update | delete | none, detail}
export def plan [args: record]: nothing -> record {
    let want = (check-string $args.state? "state" "present")
    if $want not-in ["present" "absent"] {
        error make {msg: $"invalid state: expected present or absent \(got ($want)\)"}
    }
    let record = (wanted $args)
    let existing = (load servers $record.hostname)
    let existing = if $existing != null and ($existing | is-local) { $existing } else { null }
    if $want == "absent" {
        return (if $existing == null {
            {change: "none", detail: $"server ($record.hostname) does not exist"}
        } else {
            {change: "delete", detail: {hostname: $record.hostname, infra: $existing.infra}}
        })
    }
    if $existing == null {
        return {change: "create", detail: ($record | reject state)}
    }
    let differences = (["infra" "plan" "zone" "labels"]
        | where {|field| ($existing | get --optional $field) != ($record | get $field) }
        | each {|field| {field: $field, current: ($existing | get --optional $field), wanted: ($record | get $field)} })
    if ($differences | is-empty) {
        {change: "none", detail: $"server ($record.hostname) is as wanted"}
    } else {
        {change: "update", detail: {hostname: $record.hostname, differences: $differences}}
    }
}
