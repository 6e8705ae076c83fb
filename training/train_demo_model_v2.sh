#!/usr/bin/env bash
# The demo model v2, trained on one GPU in under ten minutes, offline, from a clone with the project installed:
#   1. the shipped demo pipeline's text encoder and UNet trained further (its VAE kept) on 60,000 renders of the
#      shapes data (large, off-centre and edge-touching shapes; one shape in 60% of the images), for UNET_SECONDS;
#   2. the edge LGP retrained on that UNet with the demo recipe (4,000 renders' Canny edges, 1,600 steps of 32), timed;
#   3. a ControlNet on the same pairs (train_controlnet), snapshots at the LGP's wall-clock time and at four times it.
# Each stage's result is packed into PACK_DIR as soon as it is done (float16 weights, tar files under 16 MiB), so a run
# cut short keeps what finished. Usage: bash train_demo_model_v2.sh WORK_DIR PACK_DIR [DEADLINE_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/../.."
work="${1:-outputs/demo-v2}"
pack="${2:-$work/packed}"
deadline="${3:-560}"  # ControlNet's longer budget is cut to end the whole run by then
unet_seconds="${UNET_SECONDS:-150}"
# Smaller sizes only to check the script on a CPU: NUM_IMAGES=1000 UNET_BATCH=8 LGP_IMAGES=100 LGP_STEPS=4 ...
num_images="${NUM_IMAGES:-60000}" unet_batch="${UNET_BATCH:-256}"
lgp_images="${LGP_IMAGES:-4000}" lgp_steps="${LGP_STEPS:-1600}"
mkdir -p "$work" "$pack"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
timings="$work/timings.txt"
note() { echo "[$(elapsed) s] $*" | tee -a "$timings"; }

note "UNet and text encoder, ${unet_seconds} s"
python3 -m pipeline_sketch_guided.training.train_demo_model --output_dir "$work/sd" \
    --init_from pipeline_sketch_guided/demo_model --num_images "$num_images" --unet_batch_size "$unet_batch" --layout anywhere --unet_steps 1000000 \
    --checkpoint_every 2000 --max_minutes "$(python3 -c "print($unet_seconds / 60)")" >"$work/sd.log" 2>&1
note "UNet done: $(grep -c . "$work/sd.log") log lines, $(tail -1 "$work/sd.log")"
python3 - "$work" <<'EOF'
import sys, torch
from diffusers import StableDiffusionPipeline
work = sys.argv[1]
StableDiffusionPipeline.from_pretrained(f"{work}/sd/pipeline").to(torch.float16).save_pretrained(f"{work}/sd-fp16")
EOF
tar -C "$work/sd-fp16" -cf "$pack/sd_unet.tar" unet
tar -C "$work" -cf "$pack/sd_rest.tar" --exclude unet sd-fp16 sd/training_report.json sd.log

note "LGP data"
python3 -m pipeline_sketch_guided.training.shapes --output_dir "$work/lgp-raw" --num_images "$lgp_images" --first_seed 1000000 --layout anywhere \
    >"$work/data.log" 2>&1
python3 -m pipeline_sketch_guided.training.prepare_data --input_dir "$work/lgp-raw" --output_dir "$work/lgp-data" \
    --resolution 64 >>"$work/data.log" 2>&1

note "edge LGP"
lgp_start=$(date +%s)
python3 -m pipeline_sketch_guided.training.train_lgp --pretrained_model_name_or_path "$work/sd/pipeline" \
    --train_data_dir "$work/lgp-data" --output_dir "$work/lgp" --cache_latents --train_batch_size 32 \
    --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 50 --max_train_steps "$lgp_steps" --checkpointing_steps 800 \
    --seed 0 --report_to none >"$work/lgp.log" 2>&1
lgp_seconds=$(( $(date +%s) - lgp_start ))
note "edge LGP done in ${lgp_seconds} s"
tar -C "$work" -cf "$pack/lgp.tar" --exclude 'checkpoint-*' lgp lgp.log

longer=$(( 4 * lgp_seconds ))
left=$(( deadline - $(elapsed) - 20 ))
(( longer > left )) && longer=$left
note "ControlNet, snapshots at ${lgp_seconds} s and ${longer} s (4x: $(( 4 * lgp_seconds )) s)"
python3 -m pipeline_sketch_guided.training.train_controlnet --pretrained_model_name_or_path "$work/sd/pipeline" \
    --train_data_dir "$work/lgp-data" --output_dir "$work/controlnet" \
    --snapshot_seconds "$lgp_seconds" "$longer" >"$work/controlnet.log" 2>&1
note "ControlNet done"
python3 - "$work" <<'EOF'
import sys, torch, pathlib
from diffusers import ControlNetModel
work = pathlib.Path(sys.argv[1])
for folder in sorted((work / "controlnet").glob("seconds-*")):
    ControlNetModel.from_pretrained(folder).to(torch.float16).save_pretrained(work / "controlnet-fp16" / folder.name)
    (work / "controlnet-fp16" / folder.name / "training.json").write_text((folder / "training.json").read_text())
EOF
tar -C "$work" -cf "$pack/controlnet.tar" controlnet-fp16 controlnet.log
note "packed"
tar -C "$work" -cf "$pack/logs.tar" timings.txt data.log sd.log lgp.log controlnet.log
