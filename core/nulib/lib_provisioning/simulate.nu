# Simulated work for the local provider (development and tests only).
#
# Every create/delete action walks through its steps with run-steps, which
# prints the progress lines and honours the test knobs found in the args:
#   delay_seconds  float, default 0.2: total simulated time, spread over the steps
#   fail           string: when non-empty, fail with it after the first step
#   fail_at        int percent: fail at the first step at or past this percent
#                  (the last step when none is); with an empty `fail` the
#                  message is "simulated failure at <n>%"
# A failure raises an error before the action changes any state.

use ./progress.nu

# steps: [[percent message]; [10 "validating"] [30 "allocating"] ...]
export def run-steps [args: record, steps: table<percent: int, message: string>]: nothing -> nothing {
    let delay = ($args.delay_seconds? | default 0.2 | into float)
    let pause = ((if $delay > 0 { $delay } else { 0.0 }) / ([($steps | length) 1] | math max) * 1sec)
    let message = ($args.fail? | default "" | into string)
    let fail_at = ($args.fail_at? | default null)

    let fail_index = if $fail_at != null {
        let past = ($steps | enumerate | where item.percent >= ($fail_at | into int))
        if ($past | is-empty) { ($steps | length) - 1 } else { $past.0.index }
    } else if $message != "" { 0 } else { -1 }

    for step in ($steps | enumerate) {
        progress $step.item.percent $step.item.message
        if $step.index == $fail_index {
            let text = if $message != "" { $message } else { $"simulated failure at ($step.item.percent)%" }
            error make {msg: $text}
        }
        sleep $pause
    }
}

# The same knobs for a provider that does real work (aws): call it at each
# step, before the step's work; it fails there when the knobs say so (`fail`
# alone: at the first step; `fail_at`: at the first step at or past it).
# Nothing is simulated: a step past the start of real work tests the clean-up.
export def fail-point [args: record, percent: int]: nothing -> nothing {
    let message = ($args.fail? | default "" | into string)
    let fail_at = ($args.fail_at? | default null)
    let hit = if $fail_at != null { $percent >= ($fail_at | into int) } else { $message != "" }
    if $hit {
        error make {msg: (if $message != "" { $message } else { $"simulated failure at ($percent)%" })}
    }
}
