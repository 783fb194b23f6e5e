# Server actions: server.create, server.delete, server.list, server.status,
# server.plan. Each dispatches on the server's provider to the module of the
# same name in lib_provisioning/providers/ (create, delete, list, status, plan
# in every one):
#   local  the development provider: JSON files, nothing is provisioned
#   aws    EC2 through the aws command line
# An unknown provider is an error, never replaced by another. (The
# orchestrator refuses it at submission already; this is defence in depth.)
#
# The provider comes from `server.provider`, else `provider`, else "local"
# (the infra shortcuts put the infra's default provider into every server).
#
# Inventory: every server created through this data directory is recorded
# under local/servers/ whatever its provider (the local provider's own
# records are its servers); the taskserv and cluster actions check their
# servers against it, and a hostname belongs to one provider at a time.

use ../lib_provisioning/args.nu [check-name check-string check-record]
use ../lib_provisioning/providers/local.nu
use ../lib_provisioning/providers/aws.nu

const PROVIDERS = ["local" "aws"]

def unknown [provider: string]: nothing -> any {
    error make {msg: $"unknown provider ($provider | to json --raw) \(known: ($PROVIDERS | str join ', ')\)"}
}

# The provider the arguments name: server.provider, else provider, else local.
def provider-of [args: record]: nothing -> string {
    let server = ($args.server? | default {})
    let named = if ($server | describe) starts-with "record" { $server.provider? } else { null }
    let provider = (check-string ($named | default $args.provider?) "provider" "local")
    if $provider not-in $PROVIDERS { unknown $provider }
    $provider
}

# The inventory's record of a hostname, refused when another provider owns it.
def owned-by [hostname: string, provider: string, hint: string]: nothing -> any {
    let known = (local load servers $hostname)
    let owner = if $known == null { null } else { $known.provider? | default "local" }
    if $owner != null and $owner != $provider {
        error make {msg: $"server ($hostname) belongs to provider ($owner), not ($provider)($hint)"}
    }
    $known
}

# args: {infra, server: {hostname, provider?, plan?, zone?, labels?, ...provider fields},
#        provider?, and the provider's knobs}
# Creating an existing server returns it with existed: true.
export def create [args: record]: nothing -> record {
    check-name $args.infra? "infra" | ignore
    let server = (check-record $args.server? "server")
    let hostname = (check-name $server.hostname? "server.hostname")
    let provider = (provider-of $args)
    owned-by $hostname $provider "" | ignore
    let created = match $provider {
        "local" => { local create $args }
        "aws" => { aws create $args }
        _ => { unknown $provider }
    }
    if $provider != "local" {
        local store servers $hostname ($created | reject existed) | ignore
    }
    $created
}

# args: {hostname, infra?, provider?, region?, and the provider's knobs}
# Also removes the taskservs recorded on the server.
# Deleting a missing server is not an error: deleted: false.
export def delete [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let provider = (provider-of $args)
    let hint = " (name its provider, or its infra on the command line: --infra)"
    owned-by $hostname $provider $hint | ignore
    match $provider {
        "local" => { local delete $args }
        "aws" => {
            let deleted = (aws delete $args)
            let taskservs = (local load-all taskservs | where server == $hostname)
            for ts in $taskservs { local remove taskservs $"($hostname)--($ts.taskserv)" }
            local remove servers $hostname | ignore
            $deleted | insert taskservs_removed ($taskservs | get taskserv)
        }
        _ => { unknown $provider }
    }
}

# args: {infra?, providers?: [name, ...], regions?: [...]}
# The servers of each provider named (default: local), of one infra or all.
export def list [args: record]: nothing -> record {
    let named = ($args.providers? | default ["local"])
    let providers = if ($named | describe) == "string" { [$named] } else { $named }
    let servers = ($providers | reduce --fold [] {|provider, all|
        $all | append (match $provider {
            "local" => { local list $args }
            "aws" => { aws list $args }
            _ => { unknown ($provider | into string) }
        })
    })
    {servers: ($servers | sort-by hostname)}
}

# args: {hostname, provider?, region?}. -> the server's record, or {state: "absent"}
export def status [args: record]: nothing -> record {
    check-name $args.hostname? "hostname" | ignore
    match (provider-of $args) {
        "local" => { local status $args }
        "aws" => { aws status $args }
        _ => { unknown (provider-of $args) }
    }
}

# args: {infra, server: {...}, state?: present | absent}. Read-only.
# -> {change: create | update | delete | none, detail}
export def plan [args: record]: nothing -> record {
    check-name $args.infra? "infra" | ignore
    let server = (check-record $args.server? "server")
    let hostname = (check-name $server.hostname? "server.hostname")
    let provider = (provider-of $args)
    owned-by $hostname $provider "" | ignore
    match $provider {
        "local" => { local plan $args }
        "aws" => { aws plan $args }
        _ => { unknown $provider }
    }
}

# args: {hostname, provider?, region?, infra?}. Read-only: what server.delete would change.
# -> {change: delete | none, detail}
export def plan-delete [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let current = (status $args)
    if ($current.state? | default "absent") in ["absent" "terminated"] {
        {change: "none", detail: $"server ($hostname) does not exist"}
    } else {
        {change: "delete", detail: $current}
    }
}
