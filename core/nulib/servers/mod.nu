# Server actions: server.create, server.delete, server.list.
# Only the local provider exists so far (development and tests): see
# lib_provisioning/providers/local.nu.

use ../lib_provisioning/progress.nu
use ../lib_provisioning/simulate.nu [run-steps]
use ../lib_provisioning/args.nu [check-name check-string check-record now-utc]
use ../lib_provisioning/providers/local.nu

# args: {infra, server: {hostname, plan?, zone?, provider?, labels?}, delay_seconds?, fail?, fail_at?}
# Creating an existing server returns it with existed: true.
export def create [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let server = (check-record $args.server? "server")
    let hostname = (check-name $server.hostname? "server.hostname")
    let provider = (check-string $server.provider? "server.provider" "local")
    if $provider != "local" {
        error make {msg: $"provider ($provider) is not supported \(only local\)"}
    }
    let record = {
        hostname: $hostname
        infra: $infra
        plan: (check-string $server.plan? "server.plan" "small")
        zone: (check-string $server.zone? "server.zone" "local-1")
        provider: "local"
        state: "running"
        ip: (local fake-ip $hostname)
        labels: (check-record $server.labels? "server.labels")
    }

    let existing = (local load servers $hostname)
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
    let saved = (local store servers $hostname ($record | insert created_at (now-utc)))
    progress 100 $"server ($hostname) running at ($record.ip)"
    $saved | insert existed false
}

# args: {hostname, infra?, delay_seconds?, fail?, fail_at?}
# Also removes the taskservs installed on the server.
# Deleting a missing server is not an error: deleted: false.
export def delete [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let existing = (local load servers $hostname)
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
    let taskservs = (local load-all taskservs | where server == $hostname)
    for ts in $taskservs { local remove taskservs $"($hostname)--($ts.taskserv)" }
    local remove servers $hostname
    progress 100 $"server ($hostname) deleted"
    {hostname: $hostname, infra: $existing.infra, deleted: true, taskservs_removed: ($taskservs | get taskserv)}
}

# args: {infra?}
export def list [args: record]: nothing -> record {
    let servers = (local load-all servers)
    let infra = ($args.infra? | default null)
    {servers: (if $infra == null { $servers } else { $servers | where infra == $infra })}
}
