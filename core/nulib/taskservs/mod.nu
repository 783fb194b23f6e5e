# Taskserv actions (a service installed on a server: containerd, kubernetes,
# cilium, ...): taskserv.create, taskserv.delete, taskserv.list.
# Local provider only (development and tests): records are
# taskservs/<hostname>--<taskserv>.json, nothing is installed.

use ../lib_provisioning/progress.nu
use ../lib_provisioning/simulate.nu [run-steps]
use ../lib_provisioning/args.nu [check-name check-string now-utc]
use ../lib_provisioning/providers/local.nu

# Version installed when the args name none.
const DEFAULT_VERSIONS = {
    containerd: "1.7.24"
    kubernetes: "1.31.4"
    cilium: "1.16.5"
}

# args: {infra, taskserv, server, version?, address?, delay_seconds?, fail?, fail_at?}
# `address`, when given, must be the server's (e.g. passed on from its creation's result).
# The server must exist. Installing an installed taskserv returns it with existed: true.
export def create [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let name = (check-name $args.taskserv? "taskserv")
    let hostname = (check-name $args.server? "server")
    let version = (check-string $args.version? "version" ($DEFAULT_VERSIONS | get --optional $name | default "latest"))

    let server = (local load servers $hostname)
    if $server == null { error make {msg: $"server ($hostname) does not exist"} }
    if $server.infra != $infra {
        error make {msg: $"server ($hostname) belongs to infra ($server.infra), not ($infra)"}
    }
    # the address to install against, e.g. passed on from the server step's result
    let address = ($args.address? | default $server.ip?)
    if $address != $server.ip? {
        error make {msg: $"address ($address) is not the address of server ($hostname) \(($server.ip?)\)"}
    }
    let key = $"($hostname)--($name)"
    let existing = (local load taskservs $key)
    if $existing != null {
        run-steps $args [[percent message]; [10 $"($name) already installed on ($hostname)"]]
        progress 100 $"($name) ($existing.version) installed"
        return ($existing | insert existed true)
    }

    run-steps $args [
        [percent message];
        [10 $"validating ($name) for ($hostname)"]
        [30 $"downloading ($name) ($version)"]
        [60 "installing"]
        [90 "configuring"]
    ]
    let record = {
        taskserv: $name
        server: $hostname
        address: $address
        infra: $infra
        version: $version
        state: "installed"
        installed_at: (now-utc)
    }
    local store taskservs $key $record
    progress 100 $"($name) ($version) installed on ($hostname)"
    $record | insert existed false
}

# args: {taskserv, server, delay_seconds?, fail?, fail_at?}
# Deleting a missing taskserv is not an error: deleted: false.
export def delete [args: record]: nothing -> record {
    let name = (check-name $args.taskserv? "taskserv")
    let hostname = (check-name $args.server? "server")
    let key = $"($hostname)--($name)"
    if (local load taskservs $key) == null {
        run-steps $args [[percent message]; [10 $"($name) is not installed on ($hostname)"]]
        progress 100 "nothing to delete"
        return {taskserv: $name, server: $hostname, deleted: false}
    }

    run-steps $args [
        [percent message];
        [10 $"validating ($name) on ($hostname)"]
        [50 "stopping"]
        [80 "uninstalling"]
    ]
    local remove taskservs $key
    progress 100 $"($name) removed from ($hostname)"
    {taskserv: $name, server: $hostname, deleted: true}
}

# args: {server?, infra?}
export def list [args: record]: nothing -> record {
    let server = ($args.server? | default null)
    let infra = ($args.infra? | default null)
    let taskservs = (local load-all taskservs
        | where {|ts| $server == null or $ts.server == $server }
        | where {|ts| $infra == null or $ts.infra == $infra })
    {taskservs: $taskservs}
}

# args: as create. Read-only: what taskserv.create would change.
# -> {change: create | update | none, detail}
export def plan-create [args: record]: nothing -> record {
    let name = (check-name $args.taskserv? "taskserv")
    let hostname = (check-name $args.server? "server")
    let version = (check-string $args.version? "version" ($DEFAULT_VERSIONS | get --optional $name | default "latest"))
    let existing = (local load taskservs $"($hostname)--($name)")
    if $existing == null {
        let server = if (local load servers $hostname) == null { "not there yet" } else { "exists" }
        return {change: "create", detail: {taskserv: $name, server: $hostname, version: $version, server_state: $server}}
    }
    if $existing.version != $version {
        return {change: "update", detail: {taskserv: $name, server: $hostname, current: $existing.version, wanted: $version}}
    }
    {change: "none", detail: $"($name) ($version) is installed on ($hostname)"}
}

# args: as delete. Read-only: what taskserv.delete would change.
export def plan-delete [args: record]: nothing -> record {
    let name = (check-name $args.taskserv? "taskserv")
    let hostname = (check-name $args.server? "server")
    if (local load taskservs $"($hostname)--($name)") == null {
        {change: "none", detail: $"($name) is not installed on ($hostname)"}
    } else {
        {change: "delete", detail: {taskserv: $name, server: $hostname}}
    }
}
