#!/bin/bash
# The LP-FT table of docs/RESULTS.md ("The head fitted first"): each dataset's plan fixed, a random
# head against head.init=probe, the TF-IDF mix on; one summary line (JSON) per run.
#
#   python benchmarks/dump_splits.py DIR            # the bundled sets' splits as JSONL (+ BBC files, if any)
#   MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf PAR=4 OUT=results bash benchmarks/head_init.sh DIR
#
# Made on a GPU machine (five runs at a time); on a 2-core CPU use PAR=1 (hours).
D=$(realpath "${1:?usage: head_init.sh SPLITS_DIR}")
MODEL=${MODEL:?set MODEL to the default model .gguf file}
OUT=${OUT:-head_init_results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() {  # name data plan... (extra --set)
  name=$1; data=$2; shift 2
  if [ -f $D/${data}_validation.jsonl ]; then files="--set data.train=$D/${data}_train.jsonl --set data.validation=$D/${data}_validation.jsonl --set data.test=$D/${data}_test.jsonl"
  else files="--set data.train=$D/${data}_train.jsonl --set data.test=$D/$( [ $data = bbcimb ] && echo bbc || echo $data )_test.jsonl --set data.split=[0.9,0.1,0.0]"; fi
  sets=""; for s in "$@"; do sets="$sets --set $s"; done
  timeout 500 ${PYTHON:-python3} -m finegrain.cli train $files --set model.name=$MODEL --set train.threads=${THREADS:-4} $sets --output $OUT/runs/$name > $OUT/runs/$name.log 2>&1
  ${PYTHON:-python3} - $name "$OUT/runs" <<'PY'
import json, sys
n, out = sys.argv[1], sys.argv[2]
try:
    m = json.load(open(f"{out}/{n}/metrics.json"))
except Exception as e:
    print(n, "FAILED", open(f"{out}/{n}.log").read()[-600:].replace("\r", "\n").splitlines()[-3:]); sys.exit()
curve = [(r["step"], round(r["macro_f1"], 4)) for r in map(json.loads, open(f"{out}/{n}/metrics.jsonl")) if r.get("split") == "validation"]
mix = m.get("tfidf_mix", {}); alone = mix.get("test_model_alone", m["test"])
l2 = [l for l in open(f"{out}/{n}.log").read().replace("\r", "\n").splitlines() if "head fitted" in l]
row = {"run": n, "test_acc": round(m["test"]["accuracy"], 4), "test_f1": round(m["test"]["macro_f1"] if "macro_f1" in m["test"] else m["test"]["macro"]["f1"], 4),
       "alone_acc": round(alone["accuracy"], 4), "alone_f1": round(alone["macro_f1"] if "macro_f1" in alone else alone["macro"]["f1"], 4),
       "mix_w": mix.get("weight"), "tfidf": [round(m["baselines"]["tfidf"]["accuracy"], 4), round(m["baselines"]["tfidf"]["macro_f1"], 4)],
       "best_step": m["train"]["best_step"], "secs": m["train"]["total_seconds"], "val": curve, "l2": l2[-1][-40:] if l2 else None}
print(json.dumps(row)); open(f"{out}/summary.jsonl", "a").write(json.dumps(row) + "\n")
PY
}
mkdir -p $OUT/runs; rm -f $OUT/runs/summary.jsonl
BBC="data.max_length=512 data.long_texts=head_tail head.pooling=mean"
P="head.init=probe"
jobs_list=(
 "b_rand bbc $BBC model.num_layers=13 lora.layers=[-2,-1] train.epochs=1"
 "b_probe bbc $BBC model.num_layers=13 lora.layers=[-2,-1] train.epochs=1 $P"
 "b7_rand bbc $BBC model.num_layers=7 lora.layers=[-2,-1] train.epochs=2"
 "b7_probe bbc $BBC model.num_layers=7 lora.layers=[-2,-1] train.epochs=2 $P"
 "bi_rand bbcimb $BBC model.num_layers=9 lora.layers=[-3,-2,-1] train.epochs=3"
 "bi_probe bbcimb $BBC model.num_layers=9 lora.layers=[-3,-2,-1] train.epochs=3 $P"
 "r_rand rt data.max_length=48 head.pooling=last model.num_layers=21 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "r_probe rt data.max_length=48 head.pooling=last model.num_layers=21 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
 "t_rand trec data.max_length=32 head.pooling=last model.num_layers=23 train.epochs=2 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "t_probe trec data.max_length=32 head.pooling=last model.num_layers=23 train.epochs=2 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
 "tf_rand trecfine data.max_length=32 head.pooling=mean model.num_layers=10 train.epochs=10 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "tf_probe trecfine data.max_length=32 head.pooling=mean model.num_layers=10 train.epochs=10 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
 "c_rand cn data.max_length=336 head.pooling=mean model.num_layers=20 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "c_probe cn data.max_length=336 head.pooling=mean model.num_layers=20 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
 "s_probe sms data.max_length=64 head.pooling=mean model.num_layers=21 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
 "s_rand sms data.max_length=64 head.pooling=mean model.num_layers=21 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "v_rand vader data.max_length=48 head.pooling=last model.num_layers=23 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1]"
 "v_probe vader data.max_length=48 head.pooling=last model.num_layers=23 train.epochs=1 lora.layers=[-6,-5,-4,-3,-2,-1] $P"
)
N=${PAR:-4}
for j in "${jobs_list[@]}"; do
  while [ $(jobs -r | wc -l) -ge $N ]; do sleep 1; done
  run $j &
done
wait
cat $OUT/runs/summary.jsonl
