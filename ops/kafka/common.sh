# ops/kafka/common.sh: shared settings and helpers, sourced (not run) by
# ops/kafka/{fetch,up,down,status,topic}.
#
# Environment (all optional):
#   KAFKA_PORT             client port of the local broker (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (default KAFKA_PORT+1000)
#   DEALLEDGER_RUN_DIR     parent of the state dir (default <repo>/.run);
#                          the state dir is $DEALLEDGER_RUN_DIR/kafka-$KAFKA_PORT
#   KAFKA_JAVA             java binary to use (default: $JAVA_HOME/bin/java,
#                          then `java`, then any /usr/lib/jvm/*/bin/java >= 17)
#   KAFKA_SECURITY         unset or `plaintext` (default): a PLAINTEXT client
#                          listener, state dir kafka-$KAFKA_PORT.
#                          `sasl_ssl`: a SASL_SSL (TLS + SCRAM-SHA-512) client
#                          listener; KAFKA_PORT defaults to 9094, the state dir
#                          is kafka-sasl_ssl-$KAFKA_PORT, and a PLAINTEXT
#                          listener for the broker itself and the ops tools
#                          runs on 127.0.0.1:KAFKA_INTERNAL_PORT
#                          (default KAFKA_PORT+2000)
# shellcheck shell=bash

KAFKA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$KAFKA_DIR/../.." && pwd -P)"
KAFKA_LIB="$KAFKA_DIR/lib"

KAFKA_SECURITY="${KAFKA_SECURITY:-plaintext}"
case "$KAFKA_SECURITY" in
  plaintext) KAFKA_PORT="${KAFKA_PORT:-9092}" ;;
  sasl_ssl) KAFKA_PORT="${KAFKA_PORT:-9094}" ;;
  *) echo "KAFKA_SECURITY must be plaintext or sasl_ssl, got '$KAFKA_SECURITY'" >&2; exit 2 ;;
esac
case "$KAFKA_PORT" in
  '' | *[!0-9]*) echo "KAFKA_PORT must be a number, got '$KAFKA_PORT'" >&2; exit 2 ;;
esac
if [ "$KAFKA_PORT" -lt 1 ] || [ "$KAFKA_PORT" -gt 65535 ]; then
  echo "KAFKA_PORT out of range: $KAFKA_PORT" >&2; exit 2
fi
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1000))}"
case "$KAFKA_CONTROLLER_PORT" in
  '' | *[!0-9]*) echo "KAFKA_CONTROLLER_PORT must be a number, got '$KAFKA_CONTROLLER_PORT'" >&2; exit 2 ;;
esac
if [ "$KAFKA_CONTROLLER_PORT" -lt 1 ] || [ "$KAFKA_CONTROLLER_PORT" -gt 65535 ] \
  || [ "$KAFKA_CONTROLLER_PORT" -eq "$KAFKA_PORT" ]; then
  echo "bad KAFKA_CONTROLLER_PORT: $KAFKA_CONTROLLER_PORT (client port $KAFKA_PORT)" >&2; exit 2
fi

KAFKA_HOST=127.0.0.1
RUN_DIR="${DEALLEDGER_RUN_DIR:-$REPO_ROOT/.run}"
# shellcheck disable=SC2034 # used by the scripts that source this file
LOCAL_BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
# Where the ops tools (TopicCommand) talk to the local broker, and with which
# client settings: the client port itself in plaintext mode, the loopback
# PLAINTEXT listener in sasl_ssl mode.
TOOLS_BOOTSTRAP="$LOCAL_BOOTSTRAP"
if [ "$KAFKA_SECURITY" = sasl_ssl ]; then
  STATE_DIR="$RUN_DIR/kafka-sasl_ssl-$KAFKA_PORT"
  KAFKA_INTERNAL_PORT="${KAFKA_INTERNAL_PORT:-$((KAFKA_PORT + 2000))}"
  case "$KAFKA_INTERNAL_PORT" in
    '' | *[!0-9]*) echo "KAFKA_INTERNAL_PORT must be a number, got '$KAFKA_INTERNAL_PORT'" >&2; exit 2 ;;
  esac
  if [ "$KAFKA_INTERNAL_PORT" -lt 1 ] || [ "$KAFKA_INTERNAL_PORT" -gt 65535 ] \
    || [ "$KAFKA_INTERNAL_PORT" -eq "$KAFKA_PORT" ] || [ "$KAFKA_INTERNAL_PORT" -eq "$KAFKA_CONTROLLER_PORT" ]; then
    echo "bad KAFKA_INTERNAL_PORT: $KAFKA_INTERNAL_PORT" >&2; exit 2
  fi
  TOOLS_BOOTSTRAP="$KAFKA_HOST:$KAFKA_INTERNAL_PORT"
  # TLS material and client settings (0700 dir; see ops/kafka/README.md).
  TLS_DIR="$STATE_DIR/tls"
  # shellcheck disable=SC2034
  CLIENT_DIR="$STATE_DIR/client"
  # shellcheck disable=SC2034
  SCRAM_MECHANISM=SCRAM-SHA-512
  # shellcheck disable=SC2034
  SCRAM_USER="${KAFKA_SCRAM_USER:-dealledger}"
  case "$SCRAM_USER" in
    '' | *[!A-Za-z0-9._-]*) echo "KAFKA_SCRAM_USER may hold only letters, digits, . _ -; got '$SCRAM_USER'" >&2; exit 2 ;;
  esac
else
  STATE_DIR="$RUN_DIR/kafka-$KAFKA_PORT"
fi
PID_FILE="$STATE_DIR/kafka.pid"
SERVER_PROPS="$STATE_DIR/server.properties"

log() { printf '%s\n' "kafka: $*" >&2; }
die() { printf '%s\n' "kafka: error: $*" >&2; exit 1; }

# port_open HOST PORT: true if a TCP connect succeeds (bash /dev/tcp, 2 s cap).
port_open() {
  local host="$1" port="$2"
  # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
  if command -v timeout >/dev/null 2>&1; then
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
  else
    bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
  fi
}

# is_our_broker PID: PID is alive and is a kafka.Kafka run on this state dir.
is_our_broker() {
  local pid="$1" cmd
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  [ -r "/proc/$pid/cmdline" ] || return 0 # no /proc: trust kill -0
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  case "$cmd" in
    *kafka.Kafka*"$SERVER_PROPS"*) return 0 ;;
    *) return 1 ;;
  esac
}

# broker_pid: prints the pid of this state dir's broker if it runs (from the pid
# file, else found by its exact server.properties path in /proc), else fails.
broker_pid() {
  local pid="" p cmd
  if [ -f "$PID_FILE" ]; then
    pid="$(tr -dc '0-9' <"$PID_FILE" || true)"
    if is_our_broker "$pid"; then
      printf '%s\n' "$pid"
      return 0
    fi
  fi
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    cmd="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)"
    case "$cmd" in
      *kafka.Kafka*"$SERVER_PROPS"*)
        printf '%s\n' "${p#/proc/}"
        return 0
        ;;
    esac
  done
  return 1
}

# java_major BIN: prints the major version of a java binary (8, 11, 17, ...).
java_major() {
  local v
  v="$("$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  case "$v" in
    1.*) v="${v#1.}" ;;
  esac
  printf '%s\n' "${v%%[!0-9]*}"
}

# find_java: sets JAVA to a java >= 17 or dies (Kafka 4.x needs Java 17+).
find_java() {
  local c m
  for c in "${KAFKA_JAVA:-}" "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java 2>/dev/null || true)" /usr/lib/jvm/*/bin/java; do
    if [ -z "$c" ] || [ ! -x "$c" ]; then continue; fi
    m="$(java_major "$c" || true)"
    if [ -n "$m" ] && [ "$m" -ge 17 ]; then
      JAVA="$c"
      return 0
    fi
  done
  die "no Java 17+ found (Kafka 4.x needs it); run ops/deps or set KAFKA_JAVA"
}

# ensure_jars: fetch the broker jars into ops/kafka/lib unless already there.
ensure_jars() {
  "$KAFKA_DIR/fetch" >&2
}

# run_tool CLASS ARGS...: runs a Kafka command-line tool from ops/kafka/lib with
# a short-lived-JVM configuration and warnings-only logging to stderr.
run_tool() {
  local cls="$1"
  shift
  find_java
  "$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2-tools.properties" \
    -cp "$KAFKA_LIB/*" "$cls" "$@"
}
