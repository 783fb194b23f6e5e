# Argument checks shared by the actions.
#
# Arguments are plain data: they are checked, stored and returned, never
# evaluated, never spliced into a command line, and used as (part of) a file
# name only after check-name has accepted them.

const NAME_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$'

# A name that may end up in a file name: hostname, taskserv, cluster, app, infra.
export def check-name [value: any, what: string]: nothing -> string {
    if $value == null { error make {msg: $"($what) is required"} }
    if ($value | describe) != "string" or $value !~ $NAME_PATTERN {
        error make {msg: $"invalid ($what): expected letters, digits, '.', '_' or '-' \(got ($value | to json --raw)\)"}
    }
    $value
}

# An optional string, with a default when absent.
export def check-string [value: any, what: string, fallback: string]: nothing -> string {
    if $value == null { return $fallback }
    if ($value | describe) != "string" {
        error make {msg: $"invalid ($what): expected a string \(got ($value | to json --raw)\)"}
    }
    $value
}

# An optional record, {} when absent.
export def check-record [value: any, what: string]: nothing -> record {
    if $value == null { return {} }
    if not (($value | describe) starts-with "record") {
        error make {msg: $"invalid ($what): expected a record \(got ($value | to json --raw)\)"}
    }
    $value
}

# An optional list of names, [] when absent.
export def check-names [value: any, what: string]: nothing -> list<string> {
    if $value == null { return [] }
    if not (($value | describe) starts-with "list") and not (($value | describe) starts-with "table") {
        error make {msg: $"invalid ($what): expected a list of names \(got ($value | to json --raw)\)"}
    }
    $value | each {|name| check-name $name $what }
}

# The current time, UTC, ISO 8601 with milliseconds.
export def now-utc []: nothing -> string {
    date now | date to-timezone UTC | format date "%Y-%m-%dT%H:%M:%S%.3fZ"
}
