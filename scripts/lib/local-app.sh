# Shared by scripts/demo and scripts/contract (source it; not a command): start the Apple
# simulator and the app on this machine, wait for them, and stop exactly what was started.
# Everything runs on 127.0.0.1; nothing reaches Apple.

LOCAL_APP_PIDS=()

# A free TCP port on 127.0.0.1 (the given one when it is free).
local_app_free_port() {
  python3 - "${1:-0}" <<'PY'
import socket, sys
want = int(sys.argv[1])
for port in ([want] if want else []) + [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print(s.getsockname()[1])
        break
    except OSError:
        continue
    finally:
        s.close()
PY
}

# Wait until FILE contains a line matching PATTERN (or the process PID exits, or SECONDS pass).
local_app_wait_for_line() {
  local file=$1 pattern=$2 pid=$3 seconds=${4:-120}
  local deadline=$(( $(date +%s) + seconds ))
  until grep -q -- "$pattern" "$file" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: process $pid exited; its log ($file):" >&2
      tail -n 30 "$file" >&2
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "error: timed out waiting for '$pattern' in $file" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Wait until URL answers HTTP at all (any status).
local_app_wait_for_http() {
  local url=$1 pid=$2 seconds=${3:-120}
  local deadline=$(( $(date +%s) + seconds ))
  until curl -s -o /dev/null "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: process $pid exited before $url answered" >&2
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "error: timed out waiting for $url" >&2
      return 1
    fi
    sleep 0.3
  done
}

# start the simulator: local_app_start_sim PORT DIR [extra apple-sim args]; sets SIM_ORIGIN,
# SIM_PID and writes each demo location's token to DIR/<name>.vpptoken (TOKEN_FILES).
local_app_start_sim() {
  local port=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  local_app_spawn "$dir/apple-sim.log" target/debug/apple-sim --listen "127.0.0.1:$port" --demo "$@"
  SIM_PID=$SPAWNED_PID
  local_app_wait_for_line "$dir/apple-sim.log" '^demo location' "$SIM_PID" 60
  # The last demo token is printed a moment after its heading.
  sleep 0.3
  SIM_ORIGIN=$(sed -n 's/^apple-sim listening on \(.*\)$/\1/p' "$dir/apple-sim.log" | head -n1)
  TOKEN_FILES=()
  local name
  while IFS= read -r name; do
    local file
    file="$dir/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '-' | tr -s '-' | sed 's/-$//').vpptoken"
    awk -v n="demo location \"$name\"" 'found { print; exit } index($0, n) == 1 { found = 1 }' \
      "$dir/apple-sim.log" | tr -d '\n' >"$file"
    TOKEN_FILES+=("$file")
  done < <(sed -n 's/^demo location "\(.*\)", token.*$/\1/p' "$dir/apple-sim.log")
}

# Run a command in the background in its own session (so its own children, e.g. the trigger
# processes `spin up` starts, can be stopped with it as one process group); output to LOG.
# Sets SPAWNED_PID (= the process group id).
local_app_spawn() {
  local log=$1
  shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  SPAWNED_PID=$!
  LOCAL_APP_PIDS+=("$SPAWNED_PID")
}

# Is anything of process group PGID still running?
local_app_group_alive() {
  kill -0 -- "-$1" 2>/dev/null
}

# Stop what this script started, newest first, each with its process group: SIGINT (as Ctrl-C
# would), then SIGTERM, then SIGKILL; wait for each so nothing is left behind.
local_app_stop() {
  local i pid
  for (( i=${#LOCAL_APP_PIDS[@]}-1; i>=0; i-- )); do
    pid=${LOCAL_APP_PIDS[$i]}
    for sig in INT TERM KILL; do
      local_app_group_alive "$pid" || break
      kill -s "$sig" -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do local_app_group_alive "$pid" || break; sleep 0.1; done
    done
    wait "$pid" 2>/dev/null || true
  done
  LOCAL_APP_PIDS=()
}

# A random key: hex of N bytes.
local_app_hex_key() {
  od -An -tx1 -N"${1:-24}" /dev/urandom | tr -d ' \n'
}
