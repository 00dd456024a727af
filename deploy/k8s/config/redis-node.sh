#!/bin/sh
# Start one Redis Cluster node in the foreground (shared by deploy/k8s and deploy/compose).
# A node keeps its identity in /data/nodes.conf; after a restart its IP may differ (new pod or container),
# so the "myself" line is rewritten to the current IP before Redis reads it; peers learn the new
# address from the node's first gossip message.
set -eu
conf=/data/nodes.conf
ip="${POD_IP:-$(hostname -i | cut -d' ' -f1)}"
if [ -f "$conf" ]; then
  sed -i -E "/myself/ s/[0-9]{1,3}(\.[0-9]{1,3}){3}:/${ip}:/" "$conf"
fi
exec redis-server /etc/redis/redis.conf \
  --cluster-announce-ip "$ip" \
  --cluster-announce-hostname "${ANNOUNCE_HOSTNAME:-$(hostname)}" \
  "$@"
