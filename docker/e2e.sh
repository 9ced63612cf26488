#!/usr/bin/env bash
# End-to-end test of the docker compose deployment (api + CPU worker + Postgres), built
# from this repository's own files. .ci/run calls it whenever a Docker engine answers.
#
#   docker/e2e.sh            build the base and the images (cached), then run every step
#   E2E_PROFILE=dev docker/e2e.sh   the same with the dev-profile binary (CI: already built)
#
# Steps: compose up from empty volumes twice in a row, the first time with two api
# replicas (the shared tags volume is seeded once, race-free, by tags-init); a stage-2 job submitted to the api runs on the
# worker from the Postgres queue and publishes its tag; the api hot-loads it and serves it;
# after an api restart the tag and the job history are still there; after an image upgrade
# (rebuild, `up -d`) the tag the job published is still there and served; a worker killed
# mid-job is started again and the job resumes from its checkpoint and finishes;
# the GPU worker image (when scripts/build-cuda.sh --stage-docker has staged it) builds and,
# with no GPU, stops with one line naming libcuda.so.1; `compose down` leaves no container
# behind. Any failure prints the logs and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=tagllm-e2e
# No registry here: the Debian base comes from debootstrap (docker/build-base.sh), and a
# release binary built on this (bookworm) host stands in for the Rust builder image.
export RUNTIME_IMAGE=${RUNTIME_IMAGE:-tagllm/debian:bookworm}
export RUST_IMAGE=${RUST_IMAGE:-$RUNTIME_IMAGE}
PORT=${E2E_PORT:-18480}
# Two host ports: one per api replica when scaled to 2.
export TAGLLM_BIND=127.0.0.1 TAGLLM_PORTS=$PORT-$((PORT + 1))
export TAGLLM_BUILD_ID=e2e
export TAGLLM_LEASE_SECONDS=6 TAGLLM_CHECKPOINT_EVERY=5
export TAGLLM_API_KEY=e2e-key TAGLLM_ADMIN_API_KEY=e2e-admin

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
dc() { "${COMPOSE[@]}" --env-file docker/.env -f docker/compose.yaml --profile cpu "$@"; }

step() { echo "== e2e: $*" >&2; }
fail() {
    echo "E2E FAILED: $*" >&2
    dc ps >&2 || true
    dc logs --no-color --tail 150 >&2 || true
    exit 1
}
cleanup() {
    dc down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The api replica's address (`dc port`, as the port range leaves the choice to Docker).
api_url() { echo "http://$(dc port --index="${1:-1}" api 8080)"; }
# curl with the keys; prints the body, fails on a non-2xx status. $API: the replica to ask.
get() { curl -fsS -H "authorization: Bearer $TAGLLM_ADMIN_API_KEY" "$API$1"; }
post() { curl -fsS -H "authorization: Bearer $TAGLLM_ADMIN_API_KEY" -H 'content-type: application/json' -d "$2" "$API$1"; }
field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1], {'v': v}))" "$1"; }

wait_for() { # seconds, description, command...
    local limit=$1 what=$2
    shift 2
    local until=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || fail "timed out after ${limit}s waiting for: $what"
        sleep 1
    done
}
healthy() { # every container of the service is healthy
    local ids cid
    ids=$(dc ps -q "$1")
    [ -n "$ids" ] || return 1
    for cid in $ids; do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] || return 1
    done
}
shipped=$(find tags -mindepth 2 -maxdepth 2 -name manifest.json | wc -l)
served_count() { get /tags | field "len(v['tags'])"; }
job_state() { get "/jobs/$1" | field "v['state']"; }
job_is() { [ "$(job_state "$1")" = "$2" ]; }
job_past() { [ "$(get "/jobs/$1" | field "v['step']")" -ge "$2" ]; }

step "images (base from debootstrap, cached as $RUNTIME_IMAGE)"
docker/build-base.sh
# E2E_PROFILE=dev (what .ci/run sets) puts the test build's binary in the images instead of
# compiling the release profile once more: the same source, its dependencies (the model's
# arithmetic) optimised as in release. A deployment builds the release binary (the default).
profile=${E2E_PROFILE:-release}
cargo build --locked --profile "$profile" --bin tagllm
cp "target/$([ "$profile" = dev ] && echo debug || echo "$profile")/tagllm" docker/bin/tagllm
scripts/setup-model.sh >/dev/null
dc build >&2

# From empty volumes, twice in a row, the first time with two api replicas: the shared tags
# volume must be seeded exactly once whatever starts first (issue: a race on copy-on-mount).
for round in 1 2; do
    cleanup
    replicas=$((3 - round))
    step "compose up from empty volumes, round $round: postgres, tags-init, $replicas api, worker-cpu"
    dc up -d --scale api=$replicas >&2 || fail "compose up (round $round)"
    wait_for 180 "api healthy" healthy api
    wait_for 60 "postgres healthy" healthy postgres
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$(dc ps -q tags-init)")" = 0 ] || fail "tags-init failed"
    for i in $(seq 1 $replicas); do
        API=$(api_url "$i")
        served=$(served_count)
        [ "$served" -eq "$shipped" ] || fail "api replica $i serves $served tags, the image ships $shipped"
    done
    echo "   $replicas api replica(s) serve the $shipped shipped tags" >&2
done
API=$(api_url 1)
if [ -f tags/QED/manifest.json ]; then # the shipped tag answers out of the box
    post /predict '{"function": "QED", "inputs": [{"smiles": "CCO"}]}' >/dev/null || fail "the shipped <QED> does not answer"
fi

# A small regression task with no domain tag, so the test does not depend on tags/.
records='[{"smiles":"CCO","y":0.3},{"smiles":"c1ccccc1","y":0.6},{"smiles":"CC(=O)O","y":0.4},
{"smiles":"CCN(CC)CC","y":0.9},{"smiles":"O=C=O","y":0.3},{"smiles":"CC(C)O","y":0.6},
{"smiles":"c1ccncc1","y":0.6},{"smiles":"CCCCCC","y":0.6},{"smiles":"CC#N","y":0.3},
{"smiles":"OCC(O)CO","y":0.9},{"smiles":"CS(C)=O","y":0.6},{"smiles":"C1CCOC1","y":0.5}]'
job() { # tag, steps
    post /train "{\"stage\": 2, \"tag\": \"$1\", \"head\": \"regression\", \"target\": \"y\",
      \"template\": \"The molecule {smiles} scores <$1>\", \"dataset\": {\"records\": $records},
      \"hyperparameters\": {\"steps\": $2, \"batch_size\": 4, \"learning_rate\": 0.001}}" | field "v['id']"
}

step "a stage-2 job through the api, run by the worker"
id=$(job E2E 12) || fail "POST /train was refused"
wait_for 300 "job $id to succeed" job_is "$id" succeeded
predict() { post /predict '{"function": "E2E", "inputs": [{"smiles": "CCO"}]}' | field "v['predictions'][0]['value']"; }
wait_for 30 "the api to hot-load <E2E> and serve it" predict
echo "   <E2E>(CCO) = $(predict)" >&2

step "api restart: tags and job history persist"
dc restart api >&2
wait_for 120 "api healthy again" healthy api
API=$(api_url 1)
job_is "$id" succeeded || fail "job $id lost its state across the api restart"
predict >/dev/null || fail "<E2E> is not served after the api restart"

step "image upgrade (rebuild, up -d): the tag the job published stays"
version() { get /tags | field "[t['version'] for t in v['tags'] if t['name'] == 'E2E'][0]"; }
before=$(version)
TAGLLM_BUILD_ID=e2e-upgrade dc build >&2
new_image=$(docker image inspect -f '{{index .Config.Labels "org.tagllm.build-id"}}' "tagllm:latest")
[ "$new_image" = e2e-upgrade ] || fail "the rebuild did not make a new image ($new_image)"
TAGLLM_BUILD_ID=e2e-upgrade dc up -d >&2 || fail "compose up -d after the upgrade"
wait_for 180 "api healthy after the upgrade" healthy api
API=$(api_url 1)
[ "$(served_count)" -eq $((shipped + 1)) ] || fail "after the upgrade the api serves $(served_count) tags, want $((shipped + 1))"
[ "$(version)" = "$before" ] || fail "<E2E> changed from version $before to $(version) across the upgrade"
job_is "$id" succeeded || fail "job $id lost its state across the upgrade"
predict >/dev/null || fail "<E2E> is not served after the upgrade"

step "worker killed mid-job, started again: the job resumes and finishes"
id2=$(job E2EResume 60) || fail "POST /train was refused"
wait_for 300 "job $id2 past step 12" job_past "$id2" 12
dc kill worker-cpu >&2
killed_at=$(get "/jobs/$id2" | field "v['step']")
echo "   killed the worker at step $killed_at" >&2
dc start worker-cpu >&2
wait_for 400 "job $id2 to succeed after the restart" job_is "$id2" succeeded
resumed=$(get "/jobs/$id2" | field "v['resumed_from_step']")
[ "$resumed" -ge 5 ] || fail "job $id2 restarted from scratch (resumed_from_step=$resumed)"
echo "   resumed from step $resumed" >&2
post /predict '{"function": "E2EResume", "inputs": ["CCO"]}' >/dev/null ||
    wait_for 30 "<E2EResume> served" post /predict '{"function": "E2EResume", "inputs": ["CCO"]}'

if [ -f docker/cuda/Dockerfile ]; then # staged by scripts/build-cuda.sh --stage-docker
    step "the GPU worker image: built without a registry; with no GPU it stops with one clear line"
    "${COMPOSE[@]}" --env-file docker/.env -f docker/compose.yaml --profile gpu build worker >&2 ||
        fail "docker compose --profile gpu build"
    out=$(docker run --rm "tagllm-cuda:${TAGLLM_IMAGE_TAG:-latest}" info --device cuda 2>&1) &&
        fail "info --device cuda succeeded with no GPU: $out"
    [ "$(echo "$out" | wc -l)" -eq 1 ] && echo "$out" | grep -q "libcuda.so.1" ||
        fail "no GPU, unclear error: $out"
    echo "   $out" >&2
else
    step "GPU worker image skipped: run scripts/build-cuda.sh --stage-docker first"
fi

step "compose down leaves nothing behind"
dc down -v --remove-orphans >&2
left=$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")
[ -z "$left" ] || fail "containers left behind: $left"
trap - EXIT
step "passed in ${SECONDS}s"
