# Sourced by the image tests that run a cluster of image nodes (tests/image/rolling-upgrade):
# reading a node's disk from outside while it runs, and logging in to its API.
# Needs: $ns (the test's network namespace).

# The partition NAME of DISK as "start size" in bytes.
image_part() { # disk, partition name
    sfdisk --json "$1" | python3 -c '
import json, sys
t = json.load(sys.stdin)["partitiontable"]
p = next(p for p in t["partitions"] if p.get("name") == sys.argv[1])
print(p["start"] * 512, p["size"] * 512)' "$2"
}

# Succeeds once DIR/password and DIR/ca.crt are read off DISK's data partition: the
# first administrator's password and the cluster CA, as the founder writes them (a copy
# of the partition, its journal replayed by e2fsck; the guest keeps running).
image_admin() { # disk, dir
    local img=$2/data.img at len ok
    read -r at len < <(image_part "$1" tessera-data)
    dd if="$1" of="$img" bs=4M iflag=skip_bytes,count_bytes skip="$at" count="$len" \
        conv=sparse status=none
    { e2fsck -fy "$img" >/dev/null 2>&1 || (($? <= 2)); } &&
        debugfs -R "cat /initial-admin-password" "$img" 2>/dev/null >"$2/password" &&
        debugfs -R "cat /tls/ca.crt" "$img" 2>/dev/null >"$2/ca.crt" &&
        [ -s "$2/password" ] && grep -q "BEGIN CERTIFICATE" "$2/ca.crt"
    ok=$?
    rm -f "$img"
    return $ok
}

# Logs in as admin with the first password read by image_admin, changes it (the first
# login must) and prints a session token. Each request is asked again for up to 120 s
# while the node answers without what was asked (a 503 during an election under TCG);
# then it fails with the last answer.
image_login() { # api (https://host:8006/api/v1), dir holding password and ca.crt
    local pw newpw tok
    pw=$(tr -d '\n' <"$2/password")
    newpw=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    tok=$(image_until_ok 120 "the first login" "$2/ca.crt" "$1/login" "d['token']" \
        -d "{\"username\":\"admin\",\"password\":\"$pw\"}") || return 1
    image_until_ok 120 "the first password change" "$2/ca.crt" "$1/password" "" \
        -H "authorization: Bearer $tok" -d "{\"old_password\":\"$pw\",\"new_password\":\"$newpw\"}" \
        >/dev/null || return 1
    image_until_ok 120 "the login with the new password" "$2/ca.crt" "$1/login" "d['token']" \
        -d "{\"username\":\"admin\",\"password\":\"$newpw\"}"
}

# POSTs to URL (curl arguments after the fifth) until it answers 2xx (and, unless EXPR
# is empty, EXPR prints on its JSON answer), for up to SECONDS; prints EXPR's value, or
# fails saying the last answer on stderr.
image_until_ok() { # seconds, what, CA file, url, expr, curl arguments...
    local secs=$1 what=$2 ca=$3 url=$4 expr=$5 deadline=$((SECONDS + $1)) out code
    shift 5
    while :; do
        out=$(ip netns exec "$ns" curl -sS --cacert "$ca" --max-time 30 \
            -H 'content-type: application/json' -w '\n%{http_code}' "$@" "$url" 2>&1) || true
        code=${out##*$'\n'}
        if [[ $code == 2?? ]] &&
            { [ -z "$expr" ] || printf '%s' "${out%$'\n'*}" | image_json "$expr" 2>/dev/null; }; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            echo "$what: no answer to use within $secs s; last: HTTP $code ${out%$'\n'*}" >&2
            return 1
        fi
        sleep 5
    done
}

# Prints a Python expression on the JSON document read from stdin (as d).
image_json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
