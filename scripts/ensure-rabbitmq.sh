#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start the local one if it is installed
# but stopped, install it with apt if we may (CI, or WARREN_INSTALL_RABBITMQ=1), else explain.
set -euo pipefail

reachable() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if reachable; then
  echo "rabbitmq: reachable on 127.0.0.1:5672"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ] || [ "${WARREN_INSTALL_RABBITMQ:-}" = "1" ]; then
    echo "rabbitmq: not installed; installing with apt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server
  else
    echo "rabbitmq: not installed and nothing listens on 127.0.0.1:5672." >&2
    echo "  Debian/Ubuntu: sudo apt-get install rabbitmq-server   (or run with WARREN_INSTALL_RABBITMQ=1)" >&2
    echo "  Or point WARREN_BROKER_URL at a broker you have." >&2
    exit 1
  fi
fi

echo "rabbitmq: starting (rabbitmq-server -detached)"
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 60); do
  if reachable; then
    echo "rabbitmq: up"
    exit 0
  fi
  sleep 1
done
echo "rabbitmq: did not come up within 60 s; see /var/log/rabbitmq/" >&2
exit 1
