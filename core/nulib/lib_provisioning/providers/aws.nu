# AWS provider: EC2 instances through the official `aws` command line (the
# awscli package, a dependency of the project, installed beside the Python
# interpreter that the runner puts on PATH).
#
# Every call is `aws ec2 <operation> --cli-input-json <request> --output json`:
# the arguments are a list (no shell), and every value travels inside one JSON
# document, so no value can become an option, and none is read as a file or a
# URL (the command line loads `file://...` parameters, but not inside
# --cli-input-json). The region is checked against the shape of region names.
#
# Credentials and endpoint come from the standard AWS variables
# (AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ...), which the runner
# gives only to the tasks of this provider ([providers.env] aws).
#
# An instance is found by its tags, never by a local record:
#   Name                      the hostname
#   provisioning:infra        the infra
#   provisioning:hostname     the hostname
#   provisioning:plan         the plan it was created from
#   provisioning:label:<key>  each label
# plus the server's own `tags`. A server "exists" when an instance with its
# hostname tag is pending, running, stopping or stopped.
#
# Provider interface (as in every providers/<name>.nu): create, delete, list,
# status, plan, each taking the action's arguments.

use ../progress.nu
use ../simulate.nu [fail-point]
use ../args.nu [check-name check-string check-record now-utc]

# plan -> instance type, when the server names no instance_type
const PLANS = {small: "t3.micro", medium: "t3.medium", large: "t3.large", xlarge: "t3.xlarge"}
const LIVE_STATES = ["pending" "running" "stopping" "stopped"]
const REGION_PATTERN = '^[a-z]{2}(-[a-z]+)+-[0-9]+$'
const TAG = "provisioning"
# how long a create waits for `running` and a delete for `terminated`, and how
# often it asks (args: wait_timeout_seconds, poll_seconds)
const WAIT_TIMEOUT_S = 300
const POLL_S = 5

# `aws ec2 <operation>` with the request as JSON; its JSON answer. A failure
# raises AWS's own message (the command line's stderr), on one line.
def ec2 [operation: string, region: any, request: record]: nothing -> any {
    let argv = ([ec2 $operation --cli-input-json ($request | to json --raw) --output json]
        | append (if $region == null { [] } else { [--region $region] }))
    let out = (with-env {AWS_PAGER: ""} { ^aws ...$argv | complete })
    if $out.exit_code != 0 {
        let message = ($out.stderr | str trim | str replace --all --regex '\s*\n\s*' ' ')
        error make {msg: (if $message == "" { $"aws ec2 ($operation) failed \(exit code ($out.exit_code)\)" } else { $message })}
    }
    let text = ($out.stdout | str trim)
    if $text == "" { {} } else { $text | from json }
}

# The region: as given, else the environment's (null: the aws profile's).
def region-of [value: any]: nothing -> any {
    let region = if $value == null {
        $env.AWS_REGION? | default ($env.AWS_DEFAULT_REGION? | default null)
    } else { $value }
    if $region == null { return null }
    if ($region | describe) != "string" or $region !~ $REGION_PATTERN {
        error make {msg: $"invalid region: expected an AWS region name like eu-west-1 \(got ($region | to json --raw)\)"}
    }
    $region
}

# Instances matching EC2 filters, in one region.
def instances [region: any, request: record]: nothing -> list<record> {
    let answer = (ec2 describe-instances $region $request)
    $answer.Reservations? | default [] | reduce --fold [] {|reservation, all| $all | append $reservation.Instances }
}

# The live instances tagged with this hostname (oldest first).
def find-server [region: any, hostname: string]: nothing -> list<record> {
    instances $region {Filters: [
        {Name: $"tag:($TAG):hostname", Values: [$hostname]}
        {Name: "instance-state-name", Values: $LIVE_STATES}
    ]}
    | sort-by LaunchTime InstanceId
    | each {|instance| to-server $instance }
}

# An instance as a server record: the instance id and addresses included.
def to-server [instance: record]: nothing -> record {
    let tags = ($instance.Tags? | default [] | reduce --fold {} {|tag, all| $all | merge {($tag.Key): $tag.Value} })
    let prefix = $"($TAG):label:"
    let labels = ($tags | columns | where {|key| $key starts-with $prefix }
        | reduce --fold {} {|key, all| $all | merge {($key | str substring ($prefix | str length)..): ($tags | get $key)} })
    let zone = ($instance.Placement?.AvailabilityZone? | default null)
    let private_ip = ($instance.PrivateIpAddress? | default null)
    let public_ip = ($instance.PublicIpAddress? | default null)
    {
        hostname: ($tags | get --optional $"($TAG):hostname" | default ($tags | get --optional Name))
        infra: ($tags | get --optional $"($TAG):infra")
        provider: "aws"
        plan: ($tags | get --optional $"($TAG):plan")
        region: (if $zone == null { null } else { $zone | str substring 0..-2 })
        zone: $zone
        instance_id: $instance.InstanceId
        instance_type: ($instance.InstanceType? | default null)
        image: ($instance.ImageId? | default null)
        state: ($instance.State?.Name? | default "unknown")
        ip: ($public_ip | default $private_ip)
        private_ip: $private_ip
        public_ip: $public_ip
        labels: $labels
        launched_at: ($instance.LaunchTime? | default null)
    }
}

# Poll until the instance is `wanted` (running or terminated), printing
# progress from `low` to `high` percent; fail when it cannot get there or the
# wait is over. Returns the server record.
def wait-for [region: any, id: string, wanted: string, args: record, low: int, high: int]: nothing -> any {
    let timeout_s = ($args.wait_timeout_seconds? | default $WAIT_TIMEOUT_S | into float)
    let poll = (($args.poll_seconds? | default $POLL_S | into float) * 1sec)
    let started = (date now)
    loop {
        # just after run-instances, EC2 may not know the id yet (eventual consistency)
        let found = (try {
            instances $region {InstanceIds: [$id]}
        } catch {|err|
            if ($err.msg | str contains "InvalidInstanceID.NotFound") { [] } else { error make {msg: $err.msg} }
        })
        let state = if ($found | is-empty) { "pending" } else { $found.0.State.Name }
        if $state == $wanted { return (to-server $found.0) }
        if $wanted == "running" and $state in ["shutting-down" "terminated" "stopping" "stopped"] {
            let reason = ($found.0.StateReason?.Message? | default "")
            error make {msg: $"instance ($id) is ($state) instead of running(if $reason != '' { $': ($reason)' } else { '' })"}
        }
        let waited_s = (((date now) - $started) / 1sec)
        if $waited_s >= $timeout_s {
            error make {msg: $"instance ($id) is still ($state) after ($timeout_s)s \(wanted ($wanted)\)"}
        }
        let percent = ($low + (($high - $low) * $waited_s / $timeout_s) | math floor)
        progress $percent $"instance ($id) ($state), waiting for ($wanted) \(($waited_s | math round)s\)"
        sleep $poll
    }
}

# A string of the server's record, checked; null when absent and optional.
def field [server: record, name: string, required: bool]: nothing -> any {
    let value = ($server | get --optional $name)
    if $value == null {
        if $required { error make {msg: $"server.($name) is required for an aws server"} }
        return null
    }
    check-string $value $"server.($name)" ""
}

# EC2's idempotency token for this launch: the same for a redelivered attempt
# of the same task (so a task run twice launches one instance), new for every
# other run. Direct runs carry no attempt: they get a fresh one each time.
def client-token [infra: string, hostname: string]: nothing -> string {
    let attempt = ($env.PROVISIONING_ATTEMPT? | default null)
    let run = if $attempt == null { random uuid } else {
        $"($env.PROVISIONING_WORKFLOW_ID? | default '')/($env.PROVISIONING_TASK_ID? | default '')/($attempt)"
    }
    $"($infra)/($hostname)/($run)" | hash md5
}

# Everything a create launches, from the action's arguments.
def launch-spec [args: record]: nothing -> record {
    let infra = (check-name $args.infra? "infra")
    let server = (check-record $args.server? "server")
    let hostname = (check-name $server.hostname? "server.hostname")
    let plan = (check-string $server.plan? "server.plan" "small")
    let instance_type = (field $server "instance_type" false | default ($PLANS | get --optional $plan))
    if $instance_type == null {
        error make {msg: $"plan ($plan) has no instance type \(known plans: ($PLANS | columns | str join ', ')\): set server.instance_type"}
    }
    let groups = ($server.security_group_ids? | default [])
    if ($groups | describe) !~ '^list' or ($groups | any {|g| ($g | describe) != "string" }) {
        error make {msg: "invalid server.security_group_ids: expected a list of strings"}
    }
    {
        infra: $infra
        hostname: $hostname
        plan: $plan
        region: (region-of (field $server "region" true))
        image: (field $server "image" true)
        instance_type: $instance_type
        zone: (field $server "zone" false)
        subnet_id: (field $server "subnet_id" false)
        key_name: (field $server "key_name" false)
        security_group_ids: $groups
        labels: (check-record $server.labels? "server.labels")
        tags: (check-record $server.tags? "server.tags")
    }
}

# The instance's tags: ours, the labels, then the server's own.
def tags-of [spec: record]: nothing -> list<record> {
    let ours = [
        {Key: "Name", Value: $spec.hostname}
        {Key: $"($TAG):infra", Value: $spec.infra}
        {Key: $"($TAG):hostname", Value: $spec.hostname}
        {Key: $"($TAG):plan", Value: $spec.plan}
    ]
    let labels = ($spec.labels | transpose key value | each {|l| {Key: $"($TAG):label:($l.key)", Value: ($l.value | into string)} })
    let own = ($spec.tags | transpose key value
        | where {|t| not ($t.key starts-with $"($TAG):") and $t.key != "Name" }
        | each {|t| {Key: $t.key, Value: ($t.value | into string)} })
    $ours | append $labels | append $own
}

# args: {infra, server: {hostname, region, image, plan?, instance_type?, zone?,
#        subnet_id?, key_name?, security_group_ids?, labels?, tags?},
#        wait_timeout_seconds?, poll_seconds?, fail?, fail_at?}
# Idempotent: when an instance already carries the hostname's tag, it is
# returned (existed: true) and nothing is launched. Otherwise one instance is
# launched and waited for until running; if anything fails after the launch,
# the instance is terminated before the task fails.
export def create [args: record]: nothing -> record {
    let spec = (launch-spec $args)
    let where = if $spec.zone != null { $spec.zone } else { $spec.region }
    fail-point $args 10
    progress 10 $"looking for server ($spec.hostname) in ($spec.region)"
    let found = (find-server $spec.region $spec.hostname)
    if ($found | is-not-empty) {
        let existing = $found.0
        if $existing.infra != $spec.infra {
            error make {msg: $"server ($spec.hostname) already exists in infra ($existing.infra) \(instance ($existing.instance_id)\)"}
        }
        if ($found | length) > 1 {
            print $"warning: ($found | length) instances carry hostname ($spec.hostname): ($found | get instance_id | str join ', '); using the oldest"
        }
        let current = if $existing.state == "pending" {
            wait-for $spec.region $existing.instance_id "running" $args 20 90
        } else { $existing }
        progress 100 $"server ($spec.hostname) already exists: ($current.instance_id) ($current.state) at ($current.ip)"
        return ($current | insert existed true)
    }

    fail-point $args 30
    progress 30 $"launching ($spec.instance_type) from ($spec.image) in ($where)"
    let request = ({
        ImageId: $spec.image
        InstanceType: $spec.instance_type
        MinCount: 1
        MaxCount: 1
        ClientToken: (client-token $spec.infra $spec.hostname)
        TagSpecifications: [{ResourceType: "instance", Tags: (tags-of $spec)}]
    }
    | merge (if $spec.zone == null { {} } else { {Placement: {AvailabilityZone: $spec.zone}} })
    | merge (if $spec.subnet_id == null { {} } else { {SubnetId: $spec.subnet_id} })
    | merge (if $spec.key_name == null { {} } else { {KeyName: $spec.key_name} })
    | merge (if ($spec.security_group_ids | is-empty) { {} } else { {SecurityGroupIds: $spec.security_group_ids} }))
    let launched = (ec2 run-instances $spec.region $request)
    let id = ($launched.Instances | first | get InstanceId)
    progress 50 $"instance ($id) launched, pending"

    try {
        fail-point $args 60
        let running = (wait-for $spec.region $id "running" $args 50 95)
        progress 100 $"server ($spec.hostname) running at ($running.ip) \(($id)\)"
        $running | insert existed false | insert created_at (now-utc)
    } catch {|err|
        # never leave a half-made server behind: it costs money and blocks a retry's lookup
        print --stderr $"create of ($spec.hostname) failed after launching ($id): terminating it"
        let cleanup = (try {
            ec2 terminate-instances $spec.region {InstanceIds: [$id]} | ignore
            "terminated"
        } catch {|cleanup_err|
            $"NOT terminated: ($cleanup_err.msg)"
        })
        error make {msg: $"($err.msg) \(instance ($id) ($cleanup)\)"}
    }
}

# args: {hostname, infra?, region?, wait_timeout_seconds?, poll_seconds?, fail?, fail_at?}
# Terminates every live instance of the hostname and waits until they are
# terminated. Missing: deleted: false.
export def delete [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let region = (region-of ($args.region? | default null))
    fail-point $args 10
    progress 10 $"looking for server ($hostname)"
    let found = (find-server $region $hostname)
    let infra = ($args.infra? | default null)
    let others = ($found | where {|s| $infra != null and $s.infra != $infra })
    if ($others | is-not-empty) {
        error make {msg: $"server ($hostname) belongs to infra ($others.0.infra), not ($infra) \(instance ($others.0.instance_id)\)"}
    }
    if ($found | is-empty) {
        progress 100 "nothing to delete"
        return {hostname: $hostname, provider: "aws", deleted: false}
    }
    let ids = ($found | get instance_id)
    fail-point $args 30
    progress 30 $"terminating ($ids | str join ', ')"
    ec2 terminate-instances $region {InstanceIds: $ids} | ignore
    for id in $ids { wait-for $region $id "terminated" $args 40 95 | ignore }
    progress 100 $"server ($hostname) deleted \(($ids | str join ', ') terminated\)"
    {hostname: $hostname, infra: $found.0.infra, provider: "aws", region: $found.0.region, deleted: true, instance_ids: $ids}
}

# args: {infra?, regions?: [...]}. The live instances this provider made (of
# one infra, or all), in each region (default: the environment's region; with
# none at all there is nothing to ask, and the list is empty).
export def list [args: record]: nothing -> list<record> {
    let given = ($args.regions? | default [])
    let regions = if ($given | is-empty) { [(region-of null)] } else { $given | each {|r| region-of $r } }
    if $regions == [null] and ($env.AWS_PROFILE? | default null) == null {
        print --stderr "aws: no region (AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE or regions): nothing listed"
        return []
    }
    let infra = ($args.infra? | default null)
    let filters = ([
        {Name: "tag-key", Values: [$"($TAG):hostname"]}
        {Name: "instance-state-name", Values: $LIVE_STATES}
    ] | append (if $infra == null { [] } else { [{Name: $"tag:($TAG):infra", Values: [(check-name $infra "infra")]}] }))
    $regions
    | reduce --fold [] {|region, all| $all | append (instances $region {Filters: $filters} | each {|i| to-server $i }) }
    | sort-by hostname instance_id
}

# args: {hostname, region?}. The server's record (instance id, state,
# addresses), or {state: "absent"}.
export def status [args: record]: nothing -> record {
    let hostname = (check-name $args.hostname? "hostname")
    let region = (region-of ($args.region? | default ($args.server?.region? | default null)))
    let found = (find-server $region $hostname)
    if ($found | is-empty) {
        {hostname: $hostname, provider: "aws", region: $region, state: "absent"}
    } else {
        $found.0
    }
}

# args: {infra, server: {...as for create}, state?: "present" | "absent"}.
# Read-only: what a create (present, the default) or a delete (absent) would
# change. -> {change: create | update | delete | none, detail}
export def plan [args: record]: nothing -> record {
    let want = (check-string $args.state? "state" "present")
    if $want not-in ["present" "absent"] {
        error make {msg: $"invalid state: expected present or absent \(got ($want)\)"}
    }
    let spec = (launch-spec $args)
    let found = (find-server $spec.region $spec.hostname)
    if $want == "absent" {
        return (if ($found | is-empty) {
            {change: "none", detail: $"no instance carries hostname ($spec.hostname) in ($spec.region)"}
        } else {
            {change: "delete", detail: {hostname: $spec.hostname, region: $spec.region, instance_ids: ($found | get instance_id)}}
        })
    }
    if ($found | is-empty) {
        return {change: "create", detail: ($spec | reject labels tags | insert labels $spec.labels)}
    }
    let current = $found.0
    let wanted = {infra: $spec.infra, instance_type: $spec.instance_type, image: $spec.image}
        | merge (if $spec.zone == null { {} } else { {zone: $spec.zone} })
    let differences = ($wanted | columns
        | where {|key| ($current | get --optional $key) != ($wanted | get $key) }
        | each {|key| {field: $key, current: ($current | get --optional $key), wanted: ($wanted | get $key)} })
    if ($differences | is-empty) {
        {change: "none", detail: {hostname: $spec.hostname, instance_id: $current.instance_id, state: $current.state}}
    } else {
        # a new image or zone means a new instance; a new type, a stop and a modify
        let replace = ($differences | any {|d| $d.field in ["image" "zone" "infra"] })
        {change: "update", detail: {hostname: $spec.hostname, instance_id: $current.instance_id, replace: $replace, differences: $differences}}
    }
}
