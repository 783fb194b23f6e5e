# Cluster actions: cluster.create, cluster.delete, cluster.list, and
# app.deploy (deploy-app). Local provider only (development and tests):
# records are clusters/<name>.json, deployed apps are listed in them.

use ../lib_provisioning/progress.nu
use ../lib_provisioning/simulate.nu [run-steps]
use ../lib_provisioning/args.nu [check-name check-string check-record check-names now-utc]
use ../lib_provisioning/providers/local.nu

# args: {infra, cluster: {name, type?, servers, apps?}, delay_seconds?, fail?, fail_at?}
# Every server must exist. Creating an existing cluster returns it with existed: true.
export def create [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let cluster = (check-record $args.cluster? "cluster")
    let name = (check-name $cluster.name? "cluster.name")
    let servers = (check-names $cluster.servers? "cluster.servers")
    if ($servers | is-empty) { error make {msg: $"cluster ($name) needs at least one server"} }
    let missing = ($servers | where {|s| (local load servers $s) == null })
    if ($missing | is-not-empty) {
        let what = if ($missing | length) == 1 { "server" } else { "servers" }
        let verb = if ($missing | length) == 1 { "does" } else { "do" }
        error make {msg: $"($what) ($missing | str join ', ') ($verb) not exist"}
    }

    let existing = (local load clusters $name)
    if $existing != null {
        if $existing.infra != $infra {
            error make {msg: $"cluster ($name) already exists in infra ($existing.infra)"}
        }
        run-steps $args [[percent message]; [10 $"cluster ($name) exists"]]
        progress 100 $"cluster ($name) already running"
        return ($existing | insert existed true)
    }

    let type = (check-string $cluster.type? "cluster.type" "kubernetes")
    run-steps $args [
        [percent message];
        [10 $"validating cluster ($name)"]
        [30 $"bootstrapping ($type) on ($servers | str join ', ')"]
        [60 "joining nodes"]
        [90 "deploying apps"]
    ]
    let record = {
        name: $name
        infra: $infra
        type: $type
        provider: "local"
        servers: $servers
        apps: (check-names $cluster.apps? "cluster.apps" | uniq)
        state: "running"
        created_at: (now-utc)
    }
    local store clusters $name $record
    progress 100 $"cluster ($name) running"
    $record | insert existed false
}

# args: {name (or cluster), infra?, delay_seconds?, fail?, fail_at?}
# Deleting a missing cluster is not an error: deleted: false.
export def delete [args: record]: nothing -> record {
    let name = (check-name ($args.name? | default $args.cluster?) "name")
    let existing = (local load clusters $name)
    if $existing != null and $args.infra? != null and $existing.infra != $args.infra {
        error make {msg: $"cluster ($name) belongs to infra ($existing.infra), not ($args.infra)"}
    }
    if $existing == null {
        run-steps $args [[percent message]; [10 $"cluster ($name) does not exist"]]
        progress 100 "nothing to delete"
        return {name: $name, deleted: false}
    }

    run-steps $args [
        [percent message];
        [10 $"validating cluster ($name)"]
        [50 "draining nodes"]
        [80 "tearing down"]
    ]
    local remove clusters $name
    progress 100 $"cluster ($name) deleted"
    {name: $name, infra: $existing.infra, deleted: true}
}

# args: {infra?}
export def list [args: record]: nothing -> record {
    let clusters = (local load-all clusters)
    let infra = ($args.infra? | default null)
    {clusters: (if $infra == null { $clusters } else { $clusters | where infra == $infra })}
}

# app.deploy. args: {infra, cluster, app, delay_seconds?, fail?, fail_at?}
# The cluster must exist; deploying a deployed app returns it with existed: true.
export def deploy-app [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let name = (check-name $args.cluster? "cluster")
    let app = (check-name $args.app? "app")
    let cluster = (local load clusters $name)
    if $cluster == null { error make {msg: $"cluster ($name) does not exist"} }
    if $cluster.infra != $infra {
        error make {msg: $"cluster ($name) belongs to infra ($cluster.infra), not ($infra)"}
    }
    let existed = ($app in $cluster.apps)

    run-steps $args (if $existed {
        [[percent message]; [10 $"($app) already deployed on ($name)"]]
    } else {
        [
            [percent message];
            [10 $"validating ($app) for ($name)"]
            [40 "rendering manifests"]
            [70 "applying"]
            [90 "waiting for rollout"]
        ]
    })
    if not $existed {
        local store clusters $name ($cluster | update apps ($cluster.apps | append $app))
    }
    progress 100 $"($app) deployed on ($name)"
    {app: $app, cluster: $name, infra: $infra, state: "deployed", deployed_at: (now-utc), existed: $existed}
}

# args: as create. Read-only: what cluster.create would change.
# -> {change: create | update | none, detail}
export def plan-create [args: record]: nothing -> record {
    let cluster = (check-record $args.cluster? "cluster")
    let name = (check-name $cluster.name? "cluster.name")
    let servers = (check-names $cluster.servers? "cluster.servers")
    let existing = (local load clusters $name)
    if $existing == null {
        return {change: "create", detail: {name: $name, servers: $servers}}
    }
    let differences = ([["field" "current" "wanted"]; ["servers" ($existing.servers | sort) ($servers | sort)]]
        | where {|d| $d.current != $d.wanted })
    if ($differences | is-empty) {
        {change: "none", detail: $"cluster ($name) is as wanted"}
    } else {
        {change: "update", detail: {name: $name, differences: $differences}}
    }
}

# args: as delete. Read-only: what cluster.delete would change.
export def plan-delete [args: record]: nothing -> record {
    let name = (check-name ($args.name? | default $args.cluster?) "name")
    if (local load clusters $name) == null {
        {change: "none", detail: $"cluster ($name) does not exist"}
    } else {
        {change: "delete", detail: {name: $name}}
    }
}

# args: as deploy-app. Read-only: what app.deploy would change.
export def plan-deploy [args: record]: nothing -> record {
    let name = (check-name $args.cluster? "cluster")
    let app = (check-name $args.app? "app")
    let cluster = (local load clusters $name)
    if $cluster == null {
        {change: "create", detail: {app: $app, cluster: $name, cluster_state: "not there yet"}}
    } else if $app in $cluster.apps {
        {change: "none", detail: $"($app) is deployed on ($name)"}
    } else {
        {change: "create", detail: {app: $app, cluster: $name}}
    }
}
