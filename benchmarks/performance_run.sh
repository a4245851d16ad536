#!/bin/bash
# Every table of docs/performance.md in one run, in a row, on an idle machine (about 15 minutes on
# 2 cores; the peer venvs must exist: benchmarks/peers.py --setup). Outputs go to out/bench/.
set -u
cd "$(dirname "$0")/.."
P=.venv/bin/python
mkdir -p out/bench
date > out/bench/started.txt
$P benchmarks/peers.py --models mlp resnet18 mobilenet_v3_small --max-rss 19 --timeout 600 \
    --output out/peers/results_s3.json > out/bench/peers.txt 2>&1
$P benchmarks/peers.py --models vgg11 --tools rebasin --max-rss 19 --timeout 600 \
    --output out/peers/results_s3_vgg.json > out/bench/peers_vgg.txt 2>&1
$P benchmarks/solver_speed.py --models mlp resnet18 mobilenet_v3_small llama-tiny gpt2-tiny \
    --inits greedy sorted identity > out/bench/solver_speed.txt 2>&1
$P benchmarks/profile_solver.py --model resnet18 > out/bench/profile.txt 2>&1
$P benchmarks/hf_scale.py --layers 6 --extrapolate --json out/bench/hf6.json > out/bench/hf6.txt 2>&1
$P benchmarks/hf_scale.py --layers 22 --json out/bench/hf22.json > out/bench/hf22.txt 2>&1
$P benchmarks/tracer_agreement.py > out/bench/tracer_agreement.txt 2>&1
date > out/bench/finished.txt
