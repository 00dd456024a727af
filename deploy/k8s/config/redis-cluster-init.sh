#!/bin/sh
# One-shot: join the Redis nodes into a cluster with REPLICAS replicas per primary. Idempotent: exits 0
# when the cluster is already formed. Shared by deploy/k8s (Job) and deploy/compose (cluster-init).
# Env: NODES (space-separated host or host:port, port default 6379), REPLICAS (default 1).
set -eu
: "${NODES:?set NODES to the node addresses}"
replicas="${REPLICAS:-1}"

host_of() { case "$1" in *:*) echo "${1%:*}" ;; *) echo "$1" ;; esac; }
port_of() { case "$1" in *:*) echo "${1##*:}" ;; *) echo 6379 ;; esac; }
cli() { node="$1"; shift; redis-cli -h "$(host_of "$node")" -p "$(port_of "$node")" "$@"; }

count=0
for node in $NODES; do
  count=$((count + 1))
  tries=0
  until cli "$node" ping 2>/dev/null | grep -q PONG; do
    tries=$((tries + 1))
    [ "$tries" -le 120 ] || { echo "node $node not answering" >&2; exit 1; }
    sleep 1
  done
done
first="${NODES%% *}"
known=$(cli "$first" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')
if [ "$known" = "$count" ]; then
  echo "cluster already formed ($known nodes)"
else
  # CLUSTER MEET takes IP addresses only: resolve the names here.
  addrs=""
  for node in $NODES; do
    ip=$(getent hosts "$(host_of "$node")" | cut -d' ' -f1 | head -n1)
    [ -n "$ip" ] || { echo "cannot resolve $node" >&2; exit 1; }
    addrs="$addrs $ip:$(port_of "$node")"
  done
  # shellcheck disable=SC2086  # word splitting of the address list is intended
  redis-cli --cluster create $addrs --cluster-replicas "$replicas" --cluster-yes
fi
# Every node must agree before front ends start on it (a fresh cluster converges in a few seconds).
for node in $NODES; do
  tries=0
  until info=$(cli "$node" cluster info | tr -d '\r') \
      && echo "$info" | grep -q '^cluster_state:ok' \
      && echo "$info" | grep -q "^cluster_known_nodes:$count\$"; do
    tries=$((tries + 1))
    [ "$tries" -le 60 ] || { echo "$node: not ok / not all nodes known after 60 s" >&2; echo "$info" >&2; exit 1; }
    sleep 1
  done
done
echo "cluster_state:ok on all $count nodes"
