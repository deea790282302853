#!/usr/bin/env bash
# Build a TensorRT-LLM engine for Gemma from a Hugging Face checkpoint:
#   download -> convert or quantize (TensorRT-LLM checkpoint) -> trtllm-build -> engine_build.json
#   -> optional upload to a Hugging Face repo (config.yaml's engine_repository).
#
# Written for TensorRT-LLM 0.19.0, the release in nvcr.io/nvidia/tritonserver:25.05-trtllm-python-py3
# (the base_image in config.yaml): run it inside that image, on the GPU type you will serve on.
# Run ./build_engine.sh --help for the options; docs/production.md has the whole workflow.
set -euo pipefail

readonly TRTLLM_VERSION="0.19.0"
readonly TRTLLM_IMAGE="nvcr.io/nvidia/tritonserver:25.05-trtllm-python-py3"
readonly TRTLLM_REPO_URL="https://github.com/NVIDIA/TensorRT-LLM.git"
readonly SCRIPT_NAME="build_engine.sh"

usage() {
  cat <<EOF
Usage: ./${SCRIPT_NAME} --model REPO_ID_OR_DIR --output ENGINE_DIR [options]

Builds a TensorRT-LLM ${TRTLLM_VERSION} engine for Gemma and writes ENGINE_DIR/engine_build.json, which
the Truss checks at load() (TensorRT-LLM version, GPU, limits). Run it inside ${TRTLLM_IMAGE}
on the GPU type that will serve the engine: TensorRT engines are tied to both.

Gemma generations TensorRT-LLM ${TRTLLM_VERSION} builds (text in, text out):
  Gemma 1  (GemmaForCausalLM:  gemma-2b, gemma-7b and their -it variants)
  Gemma 2  (Gemma2ForCausalLM: gemma-2-2b/9b/27b[-it]; max sequence length 4096)
  Gemma 3  text-only (Gemma3ForCausalLM: gemma-3-1b-it)
Gemma 3 4B/12B/27B are multimodal checkpoints (Gemma3ForConditionalGeneration), which this release's
engine builder does not convert: serve them with the portable engine (engine: portable).

Required:
  --model ID|DIR          Hugging Face repo id (google/gemma-7b-it) or a local folder in HF layout
  --output DIR            where the engine goes (created; must be empty or absent)

Quantization:
  --quantization Q        int8_awq (default), int8_wo, int4_awq, fp8, bf16
                            int8_awq  INT8 AWQ is not a format of TensorRT-LLM ${TRTLLM_VERSION}: the
                                      nearest one, int8_wo, is built instead (with a notice)
                            int8_wo   INT8 weight-only (W8A16), no calibration; half the weight bytes
                            int4_awq  INT4 AWQ (W4A16, group 128) via ModelOpt, calibrated on 512 samples
                            fp8       FP8 weights, activations and KV cache via ModelOpt (compute
                                      capability >= 8.9: Ada, Hopper)
                            bf16      no quantization
  --dtype D               bfloat16 (default) or float16: the unquantized parts and activations

Engine limits (trtllm-build):
  --max-batch-size N      requests in flight (default 64)
  --max-input-len N       prompt tokens (default 3072)
  --max-seq-len N         prompt + generated tokens (default 4096)
  --max-num-tokens N      tokens in one engine step (default 8192; >= --max-input-len)
  --tp-size N             tensor-parallel GPUs (default 1)

Sources and outputs:
  --hf-token TOKEN        Hugging Face token (default: \$HF_TOKEN); handed to tools via the environment
  --revision REV          checkpoint revision to download
  --workdir DIR           intermediate files (default: ENGINE_DIR.work)
  --trtllm-examples DIR   TensorRT-LLM ${TRTLLM_VERSION}'s examples/ folder (default: \$TRTLLM_EXAMPLES_DIR,
                          else a sparse clone of tag v${TRTLLM_VERSION} into the workdir)
  --upload-repo ORG/NAME  upload ENGINE_DIR to this Hugging Face model repo (created if missing)
  --private               create the upload repo private
  --dry-run               print every command, run none (no GPU or TensorRT-LLM needed)
  -h, --help              this help

Example:
  ./${SCRIPT_NAME} --model google/gemma-7b-it --output /engines/gemma-7b-it-int8 \\
      --max-batch-size 64 --max-input-len 3072 --max-seq-len 4096 --upload-repo my-org/gemma-7b-it-trtllm
EOF
}

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 2
}

note() {
  echo "${SCRIPT_NAME}: $*" >&2
}

# --- arguments -------------------------------------------------------------------------------------
MODEL=""
OUTPUT=""
QUANTIZATION="int8_awq"
DTYPE="bfloat16"
MAX_BATCH_SIZE=64
MAX_INPUT_LEN=3072
MAX_SEQ_LEN=4096
MAX_NUM_TOKENS=8192
TP_SIZE=1
HF_TOKEN_ARG="${HF_TOKEN:-}"
REVISION=""
WORKDIR=""
EXAMPLES_DIR="${TRTLLM_EXAMPLES_DIR:-}"
UPLOAD_REPO=""
PRIVATE=0
DRY_RUN=0

need_value() {
  # $1: option, $2: number of arguments left including the option, $3: the value
  if [[ "$2" -lt 2 || "$3" == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --model) need_value "$1" $# "${2:-}"; MODEL="$2"; shift 2 ;;
    --output) need_value "$1" $# "${2:-}"; OUTPUT="$2"; shift 2 ;;
    --quantization) need_value "$1" $# "${2:-}"; QUANTIZATION="$2"; shift 2 ;;
    --dtype) need_value "$1" $# "${2:-}"; DTYPE="$2"; shift 2 ;;
    --max-batch-size) need_value "$1" $# "${2:-}"; MAX_BATCH_SIZE="$2"; shift 2 ;;
    --max-input-len) need_value "$1" $# "${2:-}"; MAX_INPUT_LEN="$2"; shift 2 ;;
    --max-seq-len) need_value "$1" $# "${2:-}"; MAX_SEQ_LEN="$2"; shift 2 ;;
    --max-num-tokens) need_value "$1" $# "${2:-}"; MAX_NUM_TOKENS="$2"; shift 2 ;;
    --tp-size) need_value "$1" $# "${2:-}"; TP_SIZE="$2"; shift 2 ;;
    --hf-token) need_value "$1" $# "${2:-}"; HF_TOKEN_ARG="$2"; shift 2 ;;
    --revision) need_value "$1" $# "${2:-}"; REVISION="$2"; shift 2 ;;
    --workdir) need_value "$1" $# "${2:-}"; WORKDIR="$2"; shift 2 ;;
    --trtllm-examples) need_value "$1" $# "${2:-}"; EXAMPLES_DIR="$2"; shift 2 ;;
    --upload-repo) need_value "$1" $# "${2:-}"; UPLOAD_REPO="$2"; shift 2 ;;
    --private) PRIVATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$MODEL" ]] || die "--model is required: a Hugging Face repo id or a local checkpoint folder"
[[ -n "$OUTPUT" ]] || die "--output is required: the folder the engine is written to"

positive_int() {
  # $1: option name, $2: value, $3: upper bound
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (( 10#$2 < 1 || 10#$2 > $3 )); then
    die "$1 must be an integer in [1, $3], got '$2'"
  fi
}
positive_int --max-batch-size "$MAX_BATCH_SIZE" 4096
positive_int --max-input-len "$MAX_INPUT_LEN" 1048576
positive_int --max-seq-len "$MAX_SEQ_LEN" 1048576
positive_int --max-num-tokens "$MAX_NUM_TOKENS" 1048576
positive_int --tp-size "$TP_SIZE" 8
(( MAX_INPUT_LEN <= MAX_SEQ_LEN )) \
  || die "--max-input-len ($MAX_INPUT_LEN) must not exceed --max-seq-len ($MAX_SEQ_LEN): the sequence holds the prompt"
(( MAX_NUM_TOKENS >= MAX_INPUT_LEN )) \
  || die "--max-num-tokens ($MAX_NUM_TOKENS) must be at least --max-input-len ($MAX_INPUT_LEN) so a whole prompt fits one step"

case "$DTYPE" in
  bfloat16|float16) ;;
  *) die "--dtype must be bfloat16 or float16, got '$DTYPE'" ;;
esac

REQUESTED_QUANTIZATION="$QUANTIZATION"
case "$QUANTIZATION" in
  int8_awq)
    note "INT8 AWQ is not a quantization format of TensorRT-LLM ${TRTLLM_VERSION} (quantize.py offers" \
         "int4_awq, w4a8_awq, int8_sq, int8_wo, int4_wo, fp8; the Gemma converter offers int8/int4" \
         "weight-only). Building the nearest one, int8_wo: INT8 weight-only, the same weight bytes as" \
         "INT8 AWQ, no calibration. Use --quantization int4_awq for AWQ itself."
    QUANTIZATION="int8_wo" ;;
  int8_wo|int4_awq|fp8|bf16) ;;
  *) die "--quantization must be one of int8_awq, int8_wo, int4_awq, fp8, bf16, got '$QUANTIZATION'" ;;
esac

if [[ -n "$UPLOAD_REPO" && ! "$UPLOAD_REPO" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  die "--upload-repo must be a Hugging Face repo id like my-org/gemma-7b-it-trtllm, got '$UPLOAD_REPO'"
fi
if (( PRIVATE )) && [[ -z "$UPLOAD_REPO" ]]; then
  die "--private only applies with --upload-repo"
fi

LOCAL_MODEL=0
if [[ -d "$MODEL" ]]; then
  LOCAL_MODEL=1
elif [[ "$MODEL" == /* || "$MODEL" == .* || "$MODEL" == "~"* ]]; then
  die "--model folder '$MODEL' does not exist"
elif [[ ! "$MODEL" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  die "--model must be a Hugging Face repo id like google/gemma-7b-it or an existing folder, got '$MODEL'"
fi

if [[ -e "$OUTPUT" && -n "$(ls -A "$OUTPUT" 2>/dev/null)" ]]; then
  die "--output '$OUTPUT' exists and is not empty; choose a new folder (engines are never overwritten)"
fi

[[ -n "$WORKDIR" ]] || WORKDIR="${OUTPUT%/}.work"
CKPT_DIR="$WORKDIR/trtllm-checkpoint"
if (( LOCAL_MODEL )); then
  SRC_DIR="$MODEL"
else
  SRC_DIR="$WORKDIR/hf-checkpoint"
fi

# --- running (or printing) commands ---------------------------------------------------------------
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if (( ! DRY_RUN )); then
    "$@"
  fi
}

require_tool() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}

hf_cli() {
  # huggingface_hub >= 0.34 names its CLI `hf`; the NGC image's older one has `huggingface-cli`.
  if command -v hf >/dev/null 2>&1; then
    echo hf
  else
    echo huggingface-cli
  fi
}

if [[ -n "$HF_TOKEN_ARG" ]]; then
  export HF_TOKEN="$HF_TOKEN_ARG"
fi

# Architecture of the checkpoint, and the per-layer attention windows the server must apply
# (Gemma 2/3 alternate sliding-window and global layers; TensorRT-LLM takes them at run time).
checkpoint_facts() {
  python3 - "$1/config.json" "$MAX_SEQ_LEN" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
max_seq_len = int(sys.argv[2])
arch = (config.get("architectures") or ["unknown"])[0]
text = config.get("text_config") or config
layers = int(text.get("num_hidden_layers", 0))
window = text.get("sliding_window")
kinds = text.get("layer_types")
if kinds is None and window:
    if text.get("model_type") == "gemma2":
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    else:
        pattern = int(text.get("sliding_window_pattern") or 6)
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
windows = [min(int(window), max_seq_len) if k == "sliding_attention" else max_seq_len for k in kinds or []]
if all(w == max_seq_len for w in windows):
    windows = []
print(arch)
print(",".join(str(w) for w in windows))
PY
}

ARCHITECTURE="unknown"
ATTENTION_WINDOW=""
check_checkpoint() {
  local facts
  [[ -f "$SRC_DIR/config.json" ]] || die "$SRC_DIR has no config.json: not a Hugging Face checkpoint folder"
  require_tool python3 "needed to read the checkpoint's config.json"
  facts="$(checkpoint_facts "$SRC_DIR")"
  ARCHITECTURE="$(sed -n 1p <<<"$facts")"
  ATTENTION_WINDOW="$(sed -n 2p <<<"$facts")"
  case "$ARCHITECTURE" in
    GemmaForCausalLM|Gemma3ForCausalLM) ;;
    Gemma2ForCausalLM)
      (( MAX_SEQ_LEN <= 4096 )) || die "TensorRT-LLM ${TRTLLM_VERSION} builds Gemma 2 for --max-seq-len <= 4096, got $MAX_SEQ_LEN" ;;
    Gemma3ForConditionalGeneration)
      die "$MODEL is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration). TensorRT-LLM" \
          "${TRTLLM_VERSION}'s engine builder converts Gemma 3 text-only checkpoints (Gemma3ForCausalLM," \
          "e.g. google/gemma-3-1b-it); serve gemma-3-4b/12b/27b with the portable engine (engine: portable)." ;;
    *)
      die "$MODEL has architecture '$ARCHITECTURE'; this script builds Gemma (GemmaForCausalLM," \
          "Gemma2ForCausalLM, Gemma3ForCausalLM) with TensorRT-LLM ${TRTLLM_VERSION}'s examples/gemma" ;;
  esac
  note "checkpoint: $ARCHITECTURE${ATTENTION_WINDOW:+, attention windows per layer: $ATTENTION_WINDOW}"
}

# --- preflight: the tools and the GPU this engine is for -----------------------------------------
GPU_NAME="(queried with nvidia-smi when not a dry run)"
GPU_CC="(queried)"
preflight() {
  local version gpus
  require_tool python3 "run this script inside ${TRTLLM_IMAGE}"
  require_tool trtllm-build "run this script inside ${TRTLLM_IMAGE}, which has TensorRT-LLM ${TRTLLM_VERSION}"
  require_tool nvidia-smi "an NVIDIA GPU and driver are needed to build an engine"
  version="$(python3 -c 'from importlib.metadata import version; print(version("tensorrt_llm"))' 2>/dev/null)" \
    || die "the tensorrt_llm Python package is not installed; run inside ${TRTLLM_IMAGE}"
  [[ "$version" == "$TRTLLM_VERSION"* ]] \
    || die "TensorRT-LLM $version is installed, this script and the Truss are written for ${TRTLLM_VERSION}: run inside ${TRTLLM_IMAGE}"
  python3 -c 'import h5py, sentencepiece, safetensors, transformers' 2>/dev/null \
    || die "the converter needs h5py, sentencepiece, safetensors and transformers: python3 -m pip install h5py sentencepiece safetensors"
  gpus="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader)" || die "nvidia-smi failed"
  [[ -n "$gpus" ]] || die "nvidia-smi lists no GPU"
  GPU_NAME="$(head -n1 <<<"$gpus" | sed 's/, *[0-9.]*$//')"
  GPU_CC="$(head -n1 <<<"$gpus" | sed 's/.*, *//')"
  (( $(wc -l <<<"$gpus") >= TP_SIZE )) || die "--tp-size $TP_SIZE needs $TP_SIZE GPUs, nvidia-smi lists $(wc -l <<<"$gpus")"
  if [[ "$QUANTIZATION" == fp8 ]]; then
    python3 -c "import sys; sys.exit(0 if tuple(map(int, '$GPU_CC'.split('.'))) >= (8, 9) else 1)" \
      || die "fp8 needs compute capability >= 8.9 (Ada, Hopper); $GPU_NAME has $GPU_CC. Use int8_wo or int4_awq"
  fi
  if [[ -n "$UPLOAD_REPO" || "$LOCAL_MODEL" == 0 ]]; then
    require_tool "$(hf_cli)" "pip install huggingface_hub (for downloads and uploads)"
  fi
  note "building on $GPU_NAME (compute capability $GPU_CC) with TensorRT-LLM $version"
}

# --- steps ----------------------------------------------------------------------------------------
if (( DRY_RUN )); then
  note "dry run: printing the commands, running none"
fi
if (( LOCAL_MODEL )); then
  check_checkpoint
fi
if (( ! DRY_RUN )); then
  preflight
fi
if [[ -n "${HF_TOKEN:-}" ]]; then
  note "Hugging Face token: set (passed to tools as HF_TOKEN, never on a command line)"
fi

run mkdir -p "$WORKDIR" "$OUTPUT"

# 1. The checkpoint.
if (( ! LOCAL_MODEL )); then
  download=("$(hf_cli)" download "$MODEL" --local-dir "$SRC_DIR"
            --include "*.json" "*.safetensors" "*.model" "tokenizer*" "*.jinja")
  if [[ -n "$REVISION" ]]; then
    download+=(--revision "$REVISION")
  fi
  run "${download[@]}"
  if (( DRY_RUN )); then
    note "(the checkpoint's architecture and attention windows are read from its config.json after the download)"
  else
    check_checkpoint
  fi
fi

# 2. TensorRT-LLM's example scripts, from the pinned release.
if [[ -z "$EXAMPLES_DIR" ]]; then
  clone="$WORKDIR/TensorRT-LLM-v${TRTLLM_VERSION}"
  if [[ ! -d "$clone/examples" ]]; then
    run git clone --depth 1 --branch "v${TRTLLM_VERSION}" --filter=blob:none --sparse "$TRTLLM_REPO_URL" "$clone"
    run git -C "$clone" sparse-checkout set examples/gemma examples/quantization
  fi
  EXAMPLES_DIR="$clone/examples"
elif [[ ! -f "$EXAMPLES_DIR/gemma/convert_checkpoint.py" ]]; then
  die "--trtllm-examples '$EXAMPLES_DIR' has no gemma/convert_checkpoint.py (want TensorRT-LLM ${TRTLLM_VERSION}'s examples/)"
fi

# 3. Convert (bf16, int8 weight-only) or quantize with ModelOpt (int4 AWQ, fp8) to a TensorRT-LLM checkpoint.
case "$QUANTIZATION" in
  bf16|int8_wo)
    convert=(python3 "$EXAMPLES_DIR/gemma/convert_checkpoint.py" --ckpt-type hf --model-dir "$SRC_DIR"
             --dtype "$DTYPE" --world-size "$TP_SIZE" --output-model-dir "$CKPT_DIR")
    if [[ "$QUANTIZATION" == int8_wo ]]; then
      convert+=(--use-weight-only-with-precision int8)
    fi
    run "${convert[@]}" ;;
  int4_awq)
    run python3 "$EXAMPLES_DIR/quantization/quantize.py" --model_dir "$SRC_DIR" --dtype "$DTYPE" \
      --qformat int4_awq --awq_block_size 128 --calib_size 512 --tp_size "$TP_SIZE" --output_dir "$CKPT_DIR" ;;
  fp8)
    run python3 "$EXAMPLES_DIR/quantization/quantize.py" --model_dir "$SRC_DIR" --dtype "$DTYPE" \
      --qformat fp8 --kv_cache_dtype fp8 --calib_size 512 --tp_size "$TP_SIZE" --output_dir "$CKPT_DIR" ;;
esac

# 4. The engine. Paged KV cache and paged context FMHA are what KV-cache reuse (enable_kv_cache_reuse)
# needs; remove_input_padding packs a batch's prompts; the GEMM plugin serves bf16 and weight-only GEMMs
# (FP8 GEMMs are faster without it at serving batch sizes, as TensorRT-LLM's Gemma example builds them).
build=(trtllm-build --checkpoint_dir "$CKPT_DIR" --output_dir "$OUTPUT"
       --max_batch_size "$MAX_BATCH_SIZE" --max_input_len "$MAX_INPUT_LEN" --max_seq_len "$MAX_SEQ_LEN"
       --max_num_tokens "$MAX_NUM_TOKENS" --max_beam_width 1
       --gpt_attention_plugin auto --context_fmha enable --use_paged_context_fmha enable
       --kv_cache_type paged --remove_input_padding enable --workers "$TP_SIZE")
if [[ "$QUANTIZATION" == fp8 ]]; then
  build+=(--use_fp8_context_fmha enable)
else
  build+=(--gemm_plugin auto)
fi
run "${build[@]}"

# 5. Tokenizer files beside the engine, so the engine repo serves without a tokenizer_repository.
if (( DRY_RUN )); then
  echo "+ cp $SRC_DIR/{tokenizer*,special_tokens_map.json,generation_config.json} $OUTPUT/"
else
  for f in "$SRC_DIR"/tokenizer* "$SRC_DIR"/special_tokens_map.json "$SRC_DIR"/generation_config.json; do
    if [[ -f "$f" ]]; then
      cp "$f" "$OUTPUT/"
    fi
  done
fi

# 6. engine_build.json: what load() checks before serving this engine.
write_engine_build() {
  EB_GPU_NAME="$GPU_NAME" EB_GPU_CC="$GPU_CC" EB_QUANTIZATION="$QUANTIZATION" \
  EB_REQUESTED="$REQUESTED_QUANTIZATION" EB_DTYPE="$DTYPE" EB_MAX_BATCH_SIZE="$MAX_BATCH_SIZE" \
  EB_MAX_INPUT_LEN="$MAX_INPUT_LEN" EB_MAX_SEQ_LEN="$MAX_SEQ_LEN" EB_MAX_NUM_TOKENS="$MAX_NUM_TOKENS" \
  EB_TP_SIZE="$TP_SIZE" EB_MODEL="$MODEL" EB_REVISION="$REVISION" EB_ARCHITECTURE="$ARCHITECTURE" \
  EB_ATTENTION_WINDOW="$ATTENTION_WINDOW" EB_TRTLLM_VERSION="$TRTLLM_VERSION" EB_TRTLLM_IMAGE="$TRTLLM_IMAGE" \
  python3 - <<'PY'
import datetime, json, os
e = {k[3:]: v for k, v in os.environ.items() if k.startswith("EB_")}
window = [int(w) for w in e["ATTENTION_WINDOW"].split(",") if w]
print(json.dumps({
    "schema_version": 1,
    "tensorrt_llm_version": e["TRTLLM_VERSION"],
    "built_in_image": e["TRTLLM_IMAGE"],
    "gpu": {"name": e["GPU_NAME"], "compute_capability": e["GPU_CC"]},
    "quantization": e["QUANTIZATION"],
    "requested_quantization": e["REQUESTED"],
    "dtype": e["DTYPE"],
    "limits": {"max_batch_size": int(e["MAX_BATCH_SIZE"]), "max_input_len": int(e["MAX_INPUT_LEN"]),
               "max_seq_len": int(e["MAX_SEQ_LEN"]), "max_num_tokens": int(e["MAX_NUM_TOKENS"])},
    "tp_size": int(e["TP_SIZE"]),
    "source_checkpoint": e["MODEL"],
    "source_revision": e["REVISION"] or None,
    "architecture": e["ARCHITECTURE"],
    "paged_context_fmha": True,
    "attention_window": window,
    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=2))
PY
}
echo "+ write $OUTPUT/engine_build.json"
if (( DRY_RUN )); then
  if command -v python3 >/dev/null 2>&1; then
    write_engine_build
  fi
else
  write_engine_build > "$OUTPUT/engine_build.json"
fi

# 7. Upload.
if [[ -n "$UPLOAD_REPO" ]]; then
  upload=("$(hf_cli)" upload "$UPLOAD_REPO" "$OUTPUT" . --repo-type model
          --commit-message "TensorRT-LLM ${TRTLLM_VERSION} engine of $MODEL ($QUANTIZATION)")
  if (( PRIVATE )); then
    upload+=(--private)
  fi
  run "${upload[@]}"
  note "set engine_repository: $UPLOAD_REPO in config.yaml's model_metadata to serve it"
else
  note "engine written to $OUTPUT; set engine_repository to it (or upload it with --upload-repo)"
fi
