# Client for the orchestrator gateway, used from inside a running task
# (pattern 3: the task reports its progress over HTTP besides its stdout
# PROGRESS lines). Reads PROVISIONING_GATEWAY_URL, PROVISIONING_TASK_ID and,
# when set, TRACEPARENT and a bearer token: PROVISIONING_TASK_TOKEN (the
# per-task token its executor hands it when the gateway requires auth; it
# opens POST /tasks/<this task>/progress only), else PROVISIONING_AUTH_TOKEN.

def gateway-url []: nothing -> string {
    $env.PROVISIONING_GATEWAY_URL? | default "" | str trim --right --char "/"
}

# traceparent and Authorization headers, each only when its variable is set.
def gateway-headers []: nothing -> record {
    let trace = ($env.TRACEPARENT? | default "")
    let task_token = ($env.PROVISIONING_TASK_TOKEN? | default "")
    let token = if $task_token != "" { $task_token } else { $env.PROVISIONING_AUTH_TOKEN? | default "" }
    {}
    | if $trace != "" { insert traceparent $trace } else { $in }
    | if $token != "" { insert Authorization $"Bearer ($token)" } else { $in }
}

# {available, url, status?, error?}: whether GET <gateway>/health answers 200.
export def check-orchestrator-health []: nothing -> record {
    let url = (gateway-url)
    if $url == "" {
        return {available: false, url: "", error: "PROVISIONING_GATEWAY_URL is not set"}
    }
    try {
        let response = (http get --full --allow-errors --max-time 3sec --headers (gateway-headers) $"($url)/health")
        {available: ($response.status == 200), url: $url, status: $response.status}
    } catch {|err|
        {available: false, url: $url, error: $err.msg}
    }
}

# true when the gateway answers its health check.
export def orchestrator-available []: nothing -> bool {
    (check-orchestrator-health).available
}

# POST {progress, message} to <gateway>/tasks/<task id>/progress.
# Best effort: returns true when the gateway accepted it, false otherwise
# (and prints a log line); a task never fails because of this.
export def report-progress [percent: int, message: string]: nothing -> bool {
    let url = (gateway-url)
    let task = ($env.PROVISIONING_TASK_ID? | default "")
    if $url == "" or $task == "" {
        print "report-progress: PROVISIONING_GATEWAY_URL or PROVISIONING_TASK_ID not set, skipped"
        return false
    }
    let body = {progress: $percent, message: $message}
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
