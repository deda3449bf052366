#!/usr/bin/env bash
# The recipe of checkpoints/ddsnet-color.safetensors: every training run whose weights lead to it, in order.
#
#   training/recipes/ddsnet-color.sh RUN_DIR [TRAIN_DIR] [VAL_DIR] [TEXTURE_VAL_DIR]
#
# Each step reads the previous step's output under RUN_DIR and writes its own folder there (config.yaml,
# log.jsonl, the checkpoint). A step whose checkpoint exists is skipped, so an interrupted recipe is re-run
# with the same command. The last step writes RUN_DIR/profile3-gate/ddsnet.safetensors, the gated checkpoint with
# both profiles.
# On two CPU cores the whole chain takes about 39 hours (docs/MODEL_CARD.md, "Training").
#
# Each stage runs with its defaults (training/config.py; training/configs/ adds nothing to them) and the
# overrides below. Where a step overrides `targets`, it repeats the FLOPs targets its search used.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 4 ]; then
  echo "usage: $0 RUN_DIR [TRAIN_DIR] [VAL_DIR] [TEXTURE_VAL_DIR]" >&2
  exit 2
fi
run=$1
train_dir=${2:-../shared/data/photos/train}
val_dir=${3:-../shared/data/photos/val}
texture_val_dir=${4:-../shared/data/photos/val-texture}
train=${DDSNET_TRAIN:-ddsnet-train}
for dir in "$train_dir" "$val_dir" "$texture_val_dir"; do
  [ -d "$dir" ] || { echo "error: photo folder not found: $dir" >&2; exit 2; }
done
mkdir -p "$run"

common=(--set recipe=ddsnet-color --set "data.train_dir=$train_dir" --set "data.val_dir=$val_dir")
photo_crops=(--set 'data.scale_range=[0.3,1.0]' --set data.texture_candidates=3)
long_crops=(--set finetune_crop=192 --set finetune_batch=4 "${photo_crops[@]}")
stage1_late=(--set steps=1100 --set lr=0.0002 --set warmup_steps=30 --set 'crop_schedule=[[0,160,6],[0.5,192,4]]'
             "${photo_crops[@]}" --set val_every=200)

# Each step writes RUN_DIR/NAME/.done when it finishes; a step with that file is skipped.
done_or_run() {
  local name=$1; shift
  if [ -f "$run/$name/.done" ]; then echo "skip $name (done)"; return; fi
  echo "== $name"
  "$@"
  touch "$run/$name/.done"
}

# supernet NAME [--set ...]: a stage-1 run into RUN_DIR/NAME.
supernet() {
  local name=$1; shift
  done_or_run "$name" "$train" supernet "${common[@]}" --set "out_dir=$run/$name" "$@"
}

# tailor NAME SOURCE [--set ...]: a stage-2 run on RUN_DIR/SOURCE (a checkpoint) into RUN_DIR/NAME.
tailor() {
  local name=$1 source=$2; shift 2
  done_or_run "$name" "$train" tailor "${common[@]}" --set "supernet=$run/$source" --set "out_dir=$run/$name" "$@"
}

# Two runs in one step: a schedule stopped early, then continued with --resume under a longer one.
supernet2() {
  "$train" supernet "${common[@]}" --set "out_dir=$run/supernet2" --set "init_from=$run/supernet1/supernet.safetensors" \
    --set steps=2100 --set stop_at=600
  "$train" supernet --resume --set "out_dir=$run/supernet2" --set steps=2400 --set stop_at=0
}
tailor17() {
  "$train" tailor "${common[@]}" --set "supernet=$run/supernet9/supernet.safetensors" --set "out_dir=$run/tailor17" \
    --set 'targets=[0.7,0.59,0.45,0.25]' --set finetune_steps=750 "${long_crops[@]}" --set seed=19
  "$train" tailor --resume --set "out_dir=$run/tailor17" --set finetune_steps=1800
}

supernet supernet1 --set loss=l1 --set data.texture_candidates=1 --set 'data.scale_range=[1,1]' --set steps=2200 \
  --set lr=0.0008 --set 'crop_schedule=[[0,64,16],[0.5,96,12],[0.8,128,8]]'
# A 2,100-step schedule stopped at step 600, then continued under a 2,400-step one.
done_or_run supernet2 supernet2
supernet supernet3 --set init_from="$run/supernet2/supernet.safetensors" --set steps=1500 --set lr=0.0003 \
  --set warmup_steps=30 --set 'crop_schedule=[[0,128,8]]' --set data.texture_candidates=3 --set val_every=250
tailor tailor3 supernet3/supernet.safetensors --set 'targets=[0.7,0.45,0.25]'
supernet supernet4 --set init_from="$run/tailor3/tailored.safetensors" --set steps=1400 --set lr=0.0002 \
  --set warmup_steps=30 --set 'crop_schedule=[[0,128,8],[0.5,160,6]]' --set data.texture_candidates=3 \
  --set val_every=200
tailor tailor4 supernet4/supernet.safetensors --set 'targets=[0.7,0.45,0.25]'
supernet supernet5 --set init_from="$run/tailor4/tailored.safetensors" --set steps=1100 --set lr=0.0002 \
  --set warmup_steps=30 --set 'crop_schedule=[[0,160,6],[0.5,192,4]]' --set data.texture_candidates=3 \
  --set val_every=200
tailor tailor5 supernet5/supernet.safetensors --set 'targets=[0.7,0.57,0.45,0.25]'
tailor tailor6 tailor5/tailored.safetensors --set 'targets=[0.7,0.57,0.45,0.25]' --set finetune_steps=600 \
  --set finetune_crop=160 --set finetune_batch=6
tailor tailor7 tailor6/tailored.safetensors --set 'targets=[0.7,0.57,0.45,0.25]' --set finetune_steps=600 \
  --set finetune_crop=160 --set finetune_batch=6 "${photo_crops[@]}"
supernet supernet7 --set init_from="$run/tailor7/tailored.safetensors" "${stage1_late[@]}"
tailor tailor8 supernet7/supernet.safetensors --set 'targets=[0.7,0.59,0.45,0.25]' --set finetune_steps=800 \
  --set finetune_crop=160 --set finetune_batch=6 "${photo_crops[@]}"
tailor tailor10 tailor8/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}"
tailor tailor11 tailor10/tailored.safetensors --set search=false --set finetune_steps=1100 "${long_crops[@]}" \
  --set seed=11
supernet supernet8 --set init_from="$run/tailor11/tailored.safetensors" "${stage1_late[@]}" --set seed=12
tailor tailor12 supernet8/supernet.safetensors --set 'targets=[0.7,0.59,0.45,0.25]' --set finetune_steps=750 \
  "${long_crops[@]}" --set seed=13
tailor tailor13 tailor12/tailored.safetensors --set search=false --set finetune_steps=1100 "${long_crops[@]}" \
  --set seed=14
tailor tailor15 tailor13/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}" \
  --set seed=16
tailor tailor16 tailor15/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}" \
  --set seed=17
supernet supernet9 --set init_from="$run/tailor16/tailored.safetensors" "${stage1_late[@]}" --set seed=18
# A 750-step fine-tune, then continued under an 1,800-step schedule.
done_or_run tailor17 tailor17
tailor tailor18 tailor17/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}" \
  --set seed=20
# Sub-network 2 one channel step wider in dec0.0 (28, not 24): the search path's point under 59.8% of the FLOPs.
tailor tailor19 tailor18/tailored.safetensors --set search=false --set finetune_steps=0 --set seed=21 \
  --set 'configs=[[32,64,128,256,32,64,128,128,256,256,128,128,64,32],[32,64,128,192,28,56,48,64,192,96,96,80,56,32],[32,64,128,192,28,56,48,48,192,96,48,48,48,28],[32,56,112,192,12,32,48,48,192,96,48,48,24,24],[28,40,64,96,12,24,48,48,96,96,48,48,24,16]]'
tailor tailor20 tailor19/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}" \
  --set seed=22
tailor tailor21 tailor20/tailored.safetensors --set search=false --set finetune_steps=1200 "${long_crops[@]}" \
  --set seed=23
tailor tailor22 tailor21/tailored.safetensors --set search=false --set refill=true --set finetune_steps=0 \
  --set seed=24
done_or_run gate "$train" gate "${common[@]}" --set "tailored=$run/tailor22/tailored.safetensors" --set "out_dir=$run/gate"

# The texture round, validated on TEXTURE_VAL_DIR: stage 1 continued from the gated checkpoint on every training
# photo with a quarter of the crops dead leaves (training/deadleaves.py); the fine-tune on the same five
# configurations; the gate again.
texture=(--set "data.val_dir=$texture_val_dir" "${photo_crops[@]}" --set data.dead_leaves=0.25)
supernet texture-supernet --set init_from="$run/gate/ddsnet.safetensors" "${texture[@]}" --set steps=1500 \
  --set lr=0.0002 --set warmup_steps=30 --set 'crop_schedule=[[0,128,8],[0.5,160,6]]' --set val_every=100 \
  --set save_every=50
tailor texture-tailor texture-supernet/supernet.safetensors "${texture[@]}" --set search=false --set finetune_steps=300 \
  --set 'configs=[[32,64,128,256,32,64,128,128,256,256,128,128,64,32],[32,64,128,192,28,56,48,64,224,96,96,80,56,32],[32,64,128,192,28,56,48,48,192,96,48,48,48,28],[32,56,112,192,12,32,48,48,192,96,48,48,24,28],[28,40,64,96,12,24,48,48,128,96,48,48,24,16]]'
done_or_run texture-gate "$train" gate "${common[@]}" --set "data.val_dir=$texture_val_dir" --set val_crop=256 \
  --set "tailored=$run/texture-tailor/tailored.safetensors" --set "out_dir=$run/texture-gate"

# A profile step's crops and validation; a gate over both profiles' crops, noise and validation.
profile_crops=(--set "data.val_dir=$texture_val_dir" --set 'data.scale_range=[1.0,1.0]' --set data.texture_candidates=3
               --set val_crop=256)
profile_mix=(--set data.degradations.mix.awgn=0.3 --set data.degradations.mix.poisson_gaussian=0.1
             --set data.degradations.mix.variant=0.1 --set data.degradations.mix.jpeg=0.3
             --set data.degradations.mix.poisson_jpeg=0.1 --set data.degradations.mix.downscale=0.1
             --set 'data.degradations.jpeg_sigma=[0.0,30.0]' --set 'data.degradations.jpeg_quality=[30,95]'
             --set data.degradations.jpeg_double=0.3)
both_profiles=(--set "data.val_dir=$texture_val_dir" --set val_crop=256 --set gate.noise_stats=true "${profile_mix[@]}"
               --set 'data.val_degradations=[poisson40,ramp5-40,jpeg80-awgn15,jpeg30-awgn10,jpeg60-awgn10,jpeg95-awgn10,jpeg90x75-awgn10,poisson40-jpeg80,down0.7-awgn30]'
               --set replay=8 --set save_dtype=float16)

# The compressed profile: the texture gate's weights fine-tuned on its own five sub-networks under the mix of
# compressed and correlated noise (ProfileStage in training/config.py), on crops at the photos' own size, the
# size they are served at; its table on 256-pixel centre crops of TEXTURE_VAL_DIR at full and half size. Then
# one gate over both profiles' ten sub-networks, which reads the noise statistics, trained on a mix of every
# kind of noise and stored in float16.
done_or_run profile "$train" profile "${common[@]}" "${profile_crops[@]}" \
  --set "supernet=$run/texture-gate/ddsnet.safetensors" --set "out_dir=$run/profile"
done_or_run profile-gate "$train" gate "${common[@]}" "${both_profiles[@]}" \
  --set "tailored=$run/texture-gate/ddsnet.safetensors" --set "profiles.compressed=$run/profile/tailored.safetensors" \
  --set steps=200 --set "out_dir=$run/profile-gate"

# The compressed profile fine-tuned again, from the profile gate's compressed weights, and one gate over both
# profiles again.
done_or_run profile2 "$train" profile "${common[@]}" "${profile_crops[@]}" \
  --set "supernet=$run/profile-gate/ddsnet.safetensors" --set source_profile=compressed \
  --set finetune_steps=1200 --set seed=1 --set "out_dir=$run/profile2"
done_or_run profile2-gate "$train" gate "${common[@]}" "${both_profiles[@]}" \
  --set "tailored=$run/profile-gate/ddsnet.safetensors" --set "profiles.compressed=$run/profile2/tailored.safetensors" \
  --set steps=100 --set seed=1 --set "out_dir=$run/profile2-gate"

# The white profile fine-tuned again, from the profile2 gate's white weights, on white and near-white noise only;
# its table on the same crops, at sigma 15, 25 and 50 and under Poisson-Gaussian and ramped noise. Then one gate
# over both profiles again, with the white profile replaced in place.
done_or_run white2 "$train" profile "${common[@]}" "${profile_crops[@]}" \
  --set "supernet=$run/profile2-gate/ddsnet.safetensors" --set source_profile=white --set profile=white \
  --set 'data.degradations.mix={awgn: 0.7, poisson_gaussian: 0.15, variant: 0.15}' \
  --set 'data.val_sigmas=[15,25,50]' --set 'data.val_degradations=[poisson40,ramp5-40]' \
  --set 'data.val_scales=[1.0,0.5]' --set finetune_steps=600 --set seed=2 --set "out_dir=$run/white2"
done_or_run white2-gate "$train" gate "${common[@]}" "${both_profiles[@]}" \
  --set "tailored=$run/profile2-gate/ddsnet.safetensors" --set "profiles.white=$run/white2/tailored.safetensors" \
  --set steps=100 --set seed=3 --set "out_dir=$run/white2-gate"
# The compressed profile fine-tuned again, from the white2 gate's compressed weights, with a quarter of its crops
# white noise and JPEG up to quality 98; then one gate over both profiles again, with the compressed profile
# replaced in place.
done_or_run profile3 "$train" profile "${common[@]}" "${profile_crops[@]}" \
  --set "supernet=$run/white2-gate/ddsnet.safetensors" --set source_profile=compressed \
  --set 'data.degradations.mix={jpeg: 0.45, poisson_jpeg: 0.1, downscale: 0.2, awgn: 0.25}' \
  --set 'data.degradations.jpeg_quality=[30,98]' --set finetune_steps=1000 --set finetune_lr=0.00015 --set seed=5 \
  --set "out_dir=$run/profile3"
done_or_run profile3-gate "$train" gate "${common[@]}" "${both_profiles[@]}" \
  --set "tailored=$run/white2-gate/ddsnet.safetensors" --set "profiles.compressed=$run/profile3/tailored.safetensors" \
  --set steps=100 --set seed=5 --set "out_dir=$run/profile3-gate"
echo "recipe done: $run/profile3-gate/ddsnet.safetensors"
