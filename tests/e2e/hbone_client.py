"""An HBONE client written apart from Remora: Python's ssl for the mutual TLS, the `h2` package for
HTTP/2, one CONNECT stream per tunnel, all on one connection, as Istio's ztunnel opens them.

Usage: python3 hbone_client.py '<json>' where the JSON says
  address   "ip:port" of the HBONE listener
  ca        path of the trust bundle the server's certificate must chain to
  cert, key paths of the client certificate and key (null: present none)
  tunnels   a list of {"authority": "ip:port", "method": "CONNECT" (default), "send": text to write
            once the tunnel is open, "half_close": end the stream after sending (default true),
            "reset": reset the stream right after opening it (default false)}
  timeout   seconds to wait for every tunnel to end (default 10)
It prints one JSON object: {"error": null or why the connection failed, "tunnels": [{"status": the
response status or null, "data": what came back, "end": "end" | "reset:<code>" | "open"}, ...]}.
"""

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.errors


def main():
    spec = json.loads(sys.argv[1])
    host, port = spec["address"].rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # SPIFFE certificates name a URI, not a host
    context.load_verify_locations(spec["ca"])
    if spec.get("cert"):
        context.load_cert_chain(spec["cert"], spec["key"])
    context.set_alpn_protocols(["h2"])
    tunnels = spec["tunnels"]
    results = [{"status": None, "data": "", "end": "open"} for _ in tunnels]
    error = None
    try:
        raw = socket.create_connection((host, int(port)), timeout=5)
        sock = context.wrap_socket(raw)
        run(sock, tunnels, results, spec.get("timeout", 10))
    except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"error": error, "tunnels": results}))


def run(sock, tunnels, results, timeout):
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True,
        header_encoding="utf-8",
        # h2 4.1 wants a :path even on a plain CONNECT (RFC 9113 §8.5 forbids one); skip its check.
        validate_outbound_headers=False,
    ))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    by_stream = {}
    for index, tunnel in enumerate(tunnels):
        stream = conn.get_next_available_stream_id()
        method = tunnel.get("method", "CONNECT")
        headers = [(":method", method), (":authority", tunnel["authority"])]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        # What ztunnel sends beside the authority; the listener reads none of it.
        headers += [("forwarded", "for=127.0.0.1"), ("baggage", "k8s.namespace.name=shop")]
        conn.send_headers(stream, headers, end_stream=method != "CONNECT")
        if tunnel.get("reset"):
            conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
            results[index]["end"] = "reset:local"
        else:
            by_stream[stream] = index
    sock.sendall(conn.data_to_send())
    deadline = time.monotonic() + timeout
    while any(results[i]["end"] == "open" for i in by_stream.values()) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in conn.receive_data(data):
            index = by_stream.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.ResponseReceived) and index is not None:
                status = int(dict(event.headers)[":status"])
                results[index]["status"] = status
                tunnel = tunnels[index]
                if status == 200 and tunnel.get("send"):
                    conn.send_data(event.stream_id, tunnel["send"].encode(), end_stream=tunnel.get("half_close", True))
            elif isinstance(event, h2.events.DataReceived) and index is not None:
                results[index]["data"] += event.data.decode("utf-8", "replace")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and index is not None:
                results[index]["end"] = "end"
            elif isinstance(event, h2.events.StreamReset) and index is not None:
                results[index]["end"] = f"reset:{int(event.error_code)}"
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(f"GOAWAY {event.error_code}")
        sock.sendall(conn.data_to_send())


if __name__ == "__main__":
    main()
