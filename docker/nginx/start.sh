#!/bin/sh
# Start nginx with the container's own DNS server as its resolver. nginx resolves `app` at run time, so that
# replicas added by `--scale` join the rotation, and for that it needs a resolver: Docker's is 127.0.0.11,
# podman's is the network's gateway (aardvark-dns). /etc/resolv.conf names whichever this container has.
set -eu
resolv_conf=${RESOLV_CONF:-/etc/resolv.conf}
conf_dir=${NGINX_CONF_DIR:-/etc/nginx}
server=$(awk '$1 == "nameserver" { print $2; exit }' "$resolv_conf")
[ -n "$server" ] || { echo "start.sh: no nameserver in $resolv_conf" >&2; exit 1; }
case "$server" in *:*) server="[$server]" ;; esac
echo "resolver $server valid=10s ipv6=off;" > "$conf_dir/resolver.conf"
exec ${NGINX:-nginx} -g 'daemon off;'
