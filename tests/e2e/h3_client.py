"""An HTTP/3 client written apart from Remora, for its HTTP/3 listener's tests: aioquic's QUIC and
HTTP/3 (PyPI `aioquic`).

Usage: h3_client.py '<spec as JSON>'. The spec:
  {"address": "127.0.0.1:port", "ca": "ca.pem", "server_name": "localhost",
   "requests": [{"method": "POST", "path": "/echo", "headers": [["x-a", "1"]],
                 "chunks": ["part one ", "part two"], "trailers": [["x-checksum", "abc"]]}, ...]}
Every request is sent at once on one QUIC connection (each on its own stream; bodies in the given
chunks with a pause between them, so they stream). Prints one JSON object:
  {"certificate_serial": "...", "responses": [{"status": 200, "headers": {...}, "body": "...",
   "trailers": {...}} or {"reset": code}, ...]}
A connection that fails prints {"error": "..."} and exits 0, so the test can assert the refusal.
"""

import asyncio
import json
import ssl
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.streams = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id in self.streams:
            state = self.streams[event.stream_id]
            state["reset"] = event.error_code
            state["done"].set()
        for h3_event in self.http.handle_event(event):
            state = self.streams.get(h3_event.stream_id)
            if state is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                headers = {k.decode(): v.decode() for k, v in h3_event.headers}
                if state["status"] is None:
                    state["status"] = int(headers.pop(":status"))
                    state["headers"] = headers
                else:
                    state["trailers"] = headers
            elif isinstance(h3_event, DataReceived):
                state["body"] += h3_event.data
            if getattr(h3_event, "stream_ended", False):
                state["done"].set()

    async def request(self, authority, spec):
        stream_id = self._quic.get_next_available_stream_id()
        state = {"status": None, "headers": {}, "body": b"", "trailers": None, "reset": None,
                 "done": asyncio.Event()}
        self.streams[stream_id] = state
        method = spec.get("method", "GET").encode()
        head = [(b":method", method), (b":authority", authority.encode())]
        if method != b"CONNECT":
            head += [(b":scheme", b"https"), (b":path", spec.get("path", "/").encode())]
        head += [(k.encode(), v.encode()) for k, v in spec.get("headers", [])]
        chunks = [c.encode() for c in spec.get("chunks", [])]
        trailers = [(k.encode(), v.encode()) for k, v in spec.get("trailers", [])]
        self.http.send_headers(stream_id, head, end_stream=not chunks and not trailers)
        self.transmit()
        for chunk in chunks:
            await asyncio.sleep(0.05)
            self.http.send_data(stream_id, chunk, end_stream=False)
            self.transmit()
        if trailers:
            self.http.send_headers(stream_id, trailers, end_stream=True)
            self.transmit()
        elif chunks:
            self.http.send_data(stream_id, b"", end_stream=True)
            self.transmit()
        await asyncio.wait_for(state["done"].wait(), 20)
        if state["reset"] is not None:
            return {"reset": state["reset"]}
        return {"status": state["status"], "headers": state["headers"],
                "body": state["body"].decode(errors="replace"), "trailers": state["trailers"]}


async def main(spec):
    host, port = spec["address"].rsplit(":", 1)
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                      server_name=spec.get("server_name", "localhost"))
    configuration.load_verify_locations(spec["ca"])
    configuration.verify_mode = ssl.CERT_REQUIRED
    # A server that never answers fails the connection in 10 s, not aioquic's default minute.
    configuration.idle_timeout = 10.0
    authority = f"{spec.get('server_name', 'localhost')}:{port}"
    try:
        async with connect(host, int(port), configuration=configuration, create_protocol=Client,
                           wait_connected=True) as client:
            certificate = client._quic.tls._peer_certificate
            responses = await asyncio.gather(*(client.request(authority, r) for r in spec["requests"]))
            return {"certificate_serial": str(certificate.serial_number), "responses": responses}
    except Exception as error:  # a refused or failed connection is an answer the test checks
        return {"error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    result = asyncio.run(asyncio.wait_for(main(json.loads(sys.argv[1])), 60))
    print(json.dumps(result))
