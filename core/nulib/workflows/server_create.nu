# The seed's server_create_workflow (core/nulib/workflows/server_create.nu in the
# seed): submit the creation of an infra's servers to the orchestrator, or run it
# directly.
#
#   use workflows/server_create.nu *
#   server_create_workflow wuji --orchestrated    # -> {workflow_id, status: queued, ...}
#   server_create_workflow wuji                   # direct: -> the run's end

use ../lib_provisioning/orchestrator/client.nu [ensure-orchestrator load-config]

export def server_create_workflow [
    infra_name: string
    --orchestrated
]: nothing -> record {
    if $orchestrated {
        if not (ensure-orchestrator) {
            error make {msg: $"no orchestrator answers at ((load-config).orchestrator.endpoint)"}
        }
        let task = {type: "server_create", infra: $infra_name, params: {}}
        let url = ((load-config).orchestrator.endpoint | str trim --right --char "/")
        http post --content-type application/json $"($url)/workflows/servers/create" $task
    } else {
        do-server-create $infra_name
    }
}

# Direct execution (the seed's "old way"): the same actions, run here.
export def do-server-create [infra_name: string]: nothing -> record {
    ^provisioning server create --infra $infra_name --direct --output json | from json
}
