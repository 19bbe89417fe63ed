# The function the bootstrap sources: `main_handler EVENT` prints the result.
# What it writes to stderr goes to the log (attributed to the request).

function main_handler () {
  EVENT_DATA=$1
  echo "handling: $EVENT_DATA" 1>&2
  case "$EVENT_DATA" in
    *'"fail"'*) echo "the event asked to fail" 1>&2; return 1 ;;
  esac
  echo "Echoing request: '$EVENT_DATA'"
}
