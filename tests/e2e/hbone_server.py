"""An HBONE server written apart from Remora, serving as ztunnel's inbound side does: Python's ssl for
the mutual TLS (a client certificate from the test's CA required), the `h2` package for HTTP/2, one
CONNECT stream per tunnel, each answered `200` and joined to a TCP connection to its `:authority`.

Usage: python3 hbone_server.py '<json>' where the JSON says
  cert, key   paths of the server's certificate (with its chain) and key
  ca          path of the trust bundle client certificates must chain to
  refuse      authorities ("ip:port") answered 401 instead of tunnelled (default none)
  timeout     seconds after which the server stops by itself (default 60)
It listens on 127.0.0.1, port 0, with HTTP/2's settings left at the `h2` package's defaults (so at
most 100 streams open at once on a connection, as RFC 9113 recommends a server allow), and prints
one JSON object per line, as things happen:
  {"listening": port}
  {"connection": n, "peer": the client certificate's URI SAN}
  {"tunnel": n, "authority": ..., "status": 200 | 401 | 502, "headers": {name: value}}
  {"closed": n, "tunnels": how many it carried, "most_at_once": the most open at one time}
"""

import asyncio
import json
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def say(**fields):
    print(json.dumps(fields), flush=True)


class Connection:
    """One accepted HBONE connection: its HTTP/2 state and the tunnels it carries."""

    def __init__(self, number, reader, writer, refuse):
        self.number = number
        self.reader = reader
        self.writer = writer
        self.refuse = refuse
        self.h2 = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=False,
            header_encoding="utf-8",
            # h2 4.1 asks a CONNECT for a :path (RFC 9113 §8.5 forbids one); the checks are ours.
            validate_inbound_headers=False,
        ))
        self.targets = {}  # stream id -> the target's StreamWriter
        self.windows = {}  # stream id -> Event set when the stream's send window opens
        self.open = 0
        self.most_at_once = 0
        self.tunnels = 0

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def serve(self):
        self.h2.initiate_connection()
        self.flush()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self.h2.receive_data(data):
                    await self.handle(event)
                self.flush()
        except (OSError, h2.exceptions.ProtocolError, ssl.SSLError):
            pass
        finally:
            for target in self.targets.values():
                target.close()
            for window in self.windows.values():
                window.set()
            self.writer.close()
            say(closed=self.number, tunnels=self.tunnels, most_at_once=self.most_at_once)

    async def handle(self, event):
        if isinstance(event, h2.events.RequestReceived):
            await self.connect(event.stream_id, dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            target = self.targets.get(event.stream_id)
            if target is not None:
                target.write(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            target = self.targets.get(event.stream_id)
            if target is not None and target.can_write_eof():
                target.write_eof()
        elif isinstance(event, h2.events.StreamReset):
            self.end(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream, window in self.windows.items():
                if event.stream_id in (0, stream):
                    window.set()

    async def connect(self, stream, headers):
        authority = headers.get(":authority", "")
        if headers.get(":method") != "CONNECT" or ":path" in headers:
            status = 400
        elif authority in self.refuse:
            status = 401
        else:
            host, _, port = authority.rpartition(":")
            try:
                reader, target = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
                status = 200
            except (OSError, ValueError, asyncio.TimeoutError):
                status = 502
        shown = {k: v for k, v in headers.items() if not k.startswith(":")}
        say(tunnel=self.number, authority=authority, status=status, headers=shown)
        self.h2.send_headers(stream, [(":status", str(status))], end_stream=status != 200)
        self.flush()
        if status != 200:
            return
        self.targets[stream] = target
        self.windows[stream] = asyncio.Event()
        self.tunnels += 1
        self.open += 1
        self.most_at_once = max(self.most_at_once, self.open)
        asyncio.ensure_future(self.pump(stream, reader))

    async def pump(self, stream, reader):
        """The target's bytes back down the tunnel, within HTTP/2's flow control."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    self.h2.end_stream(stream)
                    self.flush()
                    break
                while data:
                    window = self.h2.local_flow_control_window(stream)
                    if window == 0:
                        self.windows[stream].clear()
                        await self.windows[stream].wait()
                        continue
                    size = min(window, len(data), self.h2.max_outbound_frame_size)
                    self.h2.send_data(stream, data[:size])
                    self.flush()
                    data = data[size:]
        except (OSError, KeyError, h2.exceptions.ProtocolError):
            pass
        self.end(stream)

    def end(self, stream):
        target = self.targets.pop(stream, None)
        self.windows.pop(stream, None)
        if target is not None:
            target.close()
            self.open -= 1


def peer_identity(writer):
    cert = writer.get_extra_info("peercert") or {}
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    return uris[0] if uris else None


async def main():
    spec = json.loads(sys.argv[1])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(spec["ca"])
    context.load_cert_chain(spec["cert"], spec["key"])
    context.set_alpn_protocols(["h2"])
    refuse = set(spec.get("refuse", []))
    numbers = iter(range(1, 1 << 30))

    async def accept(reader, writer):
        number = next(numbers)
        say(connection=number, peer=peer_identity(writer))
        await Connection(number, reader, writer, refuse).serve()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    say(listening=server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.sleep(spec.get("timeout", 60))


if __name__ == "__main__":
    asyncio.run(main())
