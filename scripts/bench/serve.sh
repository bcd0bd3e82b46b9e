# Sourced by the bench scripts: one `sluice serve` (embedded, pipeline running) to measure.
#
# serve_start BIN DIR PORT [VAR=VALUE ...]: starts BIN serve with its data in DIR/data, its
#   stdout and stderr in DIR/out and DIR/err, and the given environment; returns once it
#   listens on 127.0.0.1:PORT, with SERVE_PID and SERVE_KEY (the first org's key) set.
# mem_mb PID [FIELD]: FIELD of /proc/PID/status (default VmRSS) in MB.
# sampling_start PID FILE [FIELD]: writes mem_mb PID FIELD to FILE every second, in the
#   background (RSS_SAMPLER), until PID exits or sampling_stop FILE, which prints the peak.
serve_start() {
  local bin=$1 dir=$2 port=$3
  shift 3
  env "$@" "$bin" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" > "$dir/out" 2> "$dir/err" &
  SERVE_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
  SERVE_KEY=$(grep -o 'sk_[0-9a-f]*' "$dir/out")
}

mem_mb() {
  awk -v k="${2:-VmRSS}:" '$1 == k {printf "%.0f", $2 / 1024}' "/proc/$1/status"
}

sampling_start() {
  : > "$2"
  (while kill -0 "$1" 2>/dev/null; do echo "$(mem_mb "$1" "${3:-VmRSS}")" >> "$2"; sleep 1; done) &
  RSS_SAMPLER=$!
}

sampling_stop() {
  kill "$RSS_SAMPLER" 2>/dev/null || true
  wait "$RSS_SAMPLER" 2>/dev/null || true
  RSS_SAMPLER=
  sort -n "$1" | tail -1
}
