# Client for the orchestrator gateway: from inside a running task (pattern 3:
# the task reports its progress over HTTP besides its stdout PROGRESS lines),
# and the seed's helpers for scripts (load-config, check-orchestrator-health,
# orchestrator-available, ensure-orchestrator, report-progress <task> <n>). Reads PROVISIONING_GATEWAY_URL, PROVISIONING_TASK_ID and,
# when set, TRACEPARENT and a bearer token: PROVISIONING_TASK_TOKEN (the
# per-task token its executor hands it when the gateway requires auth; it
# opens POST /tasks/<this task>/progress only), else PROVISIONING_AUTH_TOKEN.

# Where the orchestrator answers: inside a task, the gateway its executor names; else
# $PROVISIONING_ORCHESTRATOR_ENDPOINT, else [orchestrator] endpoint of the user's
# configuration file, else http://localhost:9090 (the seed's address).
def gateway-url []: nothing -> string {
    let from_task = ($env.PROVISIONING_GATEWAY_URL? | default "")
    let url = if $from_task != "" { $from_task } else { (load-config).orchestrator.endpoint }
    $url | str trim --right --char "/"
}

# traceparent and Authorization headers, each only when its variable is set.
def gateway-headers []: nothing -> record {
    let trace = ($env.TRACEPARENT? | default "")
    let task_token = ($env.PROVISIONING_TASK_TOKEN? | default "")
    let token = if $task_token != "" { $task_token } else { $env.PROVISIONING_AUTH_TOKEN? | default ($env.PROVISIONING_ORCHESTRATOR_AUTH_TOKEN? | default "") }
    {}
    | if $trace != "" { insert traceparent $trace } else { $in }
    | if $token != "" { insert Authorization $"Bearer ($token)" } else { $in }
}

# The part of the configuration these helpers use (the seed's load-config): the endpoint and
# auto_start, from the environment, else the user's file, else the defaults.
export def load-config []: nothing -> record {
    let home = ($env.HOME? | default "")
    let base = ($env.XDG_CONFIG_HOME? | default $"($home)/.config")
    let path = ($env.PROVISIONING_CONFIG? | default $"($base)/provisioning/config.toml")
    let file = if ($path | path exists) { try { open $path } catch { {} } } else { {} }
    let section = ($file.orchestrator? | default {})
    # a file that gives the orchestrator's port (the seed's platform file) and no endpoint
    # points there, as the CLI does
    let port = ($section.port? | default ($file.server?.port? | default null))
    let derived = if $port != null { $"http://localhost:($port)" } else { "http://localhost:9090" }
    let endpoint = ($env.PROVISIONING_ORCHESTRATOR_ENDPOINT? | default ($section.endpoint? | default $derived))
    let auto = ($env.PROVISIONING_ORCHESTRATOR_AUTO_START? | default ($section.auto_start? | default true))
    let enabled = (($auto | into string | str lowercase) in ["true" "1" "yes" "on"])
    {orchestrator: {endpoint: $endpoint, auto_start: $enabled}}
}

# {available, url, status?, error?}: whether GET <gateway>/health answers 200. Never raises.
export def orchestrator-health []: nothing -> record {
    let url = (gateway-url)
    try {
        let response = (http get --full --allow-errors --max-time 3sec --headers (gateway-headers) $"($url)/health")
        {available: ($response.status == 200), url: $url, status: $response.status, health: $response.body}
    } catch {|err|
        {available: false, url: $url, error: $err.msg}
    }
}

# The seed's check: the /health document when the orchestrator is healthy; an error otherwise.
export def check-orchestrator-health []: nothing -> record {
    let health = (orchestrator-health)
    if not $health.available {
        error make {msg: $"Orchestrator not available at ($health.url)"}
    }
    $health.health
}

# true when the orchestrator answers its health check (the seed's orchestrator-available).
export def orchestrator-available []: nothing -> bool {
    (orchestrator-health).available
}

# The seed's ensure-orchestrator: when none answers and auto_start is on, start the local one
# (`provisioning-orchestrator --daemon`) and wait until it answers (at most a minute).
export def ensure-orchestrator []: nothing -> bool {
    if (orchestrator-available) { return true }
    if not (load-config).orchestrator.auto_start { return false }
    print "Starting orchestrator..."
    ^provisioning-orchestrator --daemon
    for _ in 1..120 {
        if (orchestrator-available) { return true }
        sleep 500ms
    }
    print --stderr "the orchestrator did not come up (see its log under the data directory)"
    false
}

# POST progress for a task. Two forms:
#   report-progress 42 "message"        inside a task: this task (PROVISIONING_TASK_ID)
#   report-progress <task id> 42        the seed's form: {progress, status: in_progress}
# Best effort: true when the gateway accepted it, false otherwise (and a log line); a task
# never fails because of it.
export def report-progress [first: any, second: any]: nothing -> bool {
    let seed_form = ($first | describe) == "string"
    let task = if $seed_form { $first } else { $env.PROVISIONING_TASK_ID? | default "" }
    let body = if $seed_form {
        {progress: ($second | into int), status: "in_progress"}
    } else {
        {progress: ($first | into int), message: ($second | into string)}
    }
    let url = (gateway-url)
    if $url == "" or $task == "" {
        print "report-progress: no task id (PROVISIONING_TASK_ID) or no orchestrator address, skipped"
        return false
    }
    try {
        let response = (http post --full --allow-errors --max-time 5sec --content-type application/json --headers (gateway-headers) $"($url)/tasks/($task)/progress" $body)
        if $response.status >= 300 {
            print $"report-progress: gateway answered ($response.status)"
        }
        $response.status < 300
    } catch {|err|
        print $"report-progress: ($err.msg)"
        false
    }
}
