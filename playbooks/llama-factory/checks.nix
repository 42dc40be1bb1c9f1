# The llama-factory smoke checks, for `nix flake check` (CPU, offline, on the tiny model):
#   smoke-llama-factory-cli     NVIDIA's train, chat and export commands, as written, with the
#                               key=value overrides of ./smoke.json
#   smoke-llama-factory-webui   the web UI starts, serves its page on 127.0.0.1, and stops by PID
# tests/test_llama_factory.py runs the same commands in a pip venv.
{
  lib,
  runCommand,
  callPackage,
  llm-finetune-tiny-model,
  llama-factory ? callPackage ./python.nix { },
}:
let
  inherit (llama-factory) python source version;
  init = callPackage ./init.nix { inherit source version; };
  smoke = builtins.fromJSON (builtins.readFile ./smoke.json);

  tinyModel = "${llm-finetune-tiny-model}";
  onTinyModel = map (builtins.replaceStrings [ "{model}" ] [ tinyModel ]) smoke.model;
  llamafactory =
    command: args: "llamafactory-cli ${command} ${lib.escapeShellArgs (args ++ onTinyModel)}";

  # In an empty directory with LLaMA-Factory's data/ and examples/, as `llamafactory-init` leaves it.
  check =
    name: script:
    runCommand "smoke-llama-factory-${name}"
      {
        nativeBuildInputs = [
          python
          init
        ];
      }
      ''
        export HOME="$TMPDIR" PYTHONDONTWRITEBYTECODE=1
        export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
        export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
        mkdir "$TMPDIR/work"
        cd "$TMPDIR/work"
        mkdir -p "$out"
        llamafactory-init
        ${script}
      '';
in
{
  smoke-llama-factory-cli = check "cli" ''
    ${llamafactory "train" (smoke.train ++ smoke.trainOverrides)}
    test -s ${smoke.adapter}/adapter_model.safetensors
    printf 'Who are you?\nexit\n' | ${llamafactory "chat" (smoke.chat ++ smoke.chatOverrides)} > chat.log
    grep -q 'Assistant: .*[^[:space:]]' chat.log
    ${llamafactory "export" smoke.export}
    test -s ${smoke.merged}/model.safetensors
    test -s ${smoke.merged}/Modelfile
    cp ${smoke.adapter}/trainer_log.jsonl chat.log "$out/"
  '';

  smoke-llama-factory-webui = check "webui" ''
    # BROWSER=true: the web UI's attempt to open a browser does nothing.
    export GRADIO_SERVER_NAME=127.0.0.1 GRADIO_SERVER_PORT=7860 BROWSER=true
    llamafactory-cli webui > webui.log 2>&1 &
    pid=$!
    served=""
    for _ in $(seq 300); do
      if python -c 'import sys, urllib.request; sys.exit(b"gradio" not in urllib.request.urlopen("http://127.0.0.1:7860/", timeout=5).read())' 2>/dev/null; then
        served=1
        break
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if [ -z "$served" ]; then
      echo "smoke-llama-factory-webui: the web UI did not serve its page; its log:" >&2
      cat webui.log >&2
      kill "$pid" 2>/dev/null || true
      exit 1
    fi
    kill "$pid"
    wait "$pid" || true
    if kill -0 "$pid" 2>/dev/null; then
      echo "smoke-llama-factory-webui: the web UI (PID $pid) did not stop" >&2
      exit 1
    fi
  '';
}
