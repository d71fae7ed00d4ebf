"""A rollout's herd from a slow client: N concurrent GetImage of one tag over C HTTP/2
connections, sent by a raw h2 client (every frame of every stream written at once) that reads
the answers at Python's pace. Prints the answers' outcomes and the server's resident memory
before, at its peak, and after every answer was read.

    python benches/herd.py --address 127.0.0.1:50051 --pid PID --repository R --tag T [--pause 2]

Needs the `h2` package (benches/requirements.txt). The server's memory is read from
/proc/PID/status: VmRSS (resident now) and VmHWM (the peak since the process started).
"""

import argparse
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def request_body(repository, tag):
    def ld(field, data):
        return bytes([(field << 3) | 2]) + varint(len(data)) + data

    image_id = ld(2, tag.encode())
    message = ld(2, repository.encode()) + ld(3, image_id)
    return b"\x00" + struct.pack(">I", len(message)) + message


def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--repository", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--streams", type=int, default=100)
    # A slow reader: nothing is read for this long after the last request is sent, so every
    # answer is ready, and held by the server, before the first is taken.
    parser.add_argument("--pause", type=float, default=2.0)
    args = parser.parse_args()
    host, port = args.address.rsplit(":", 1)
    body = request_body(args.repository, args.tag)
    before = status(args.pid)

    connections = []
    for _ in range(args.connections):
        sock = socket.create_connection((host, int(port)))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        # HTTP/2's default windows (64 KiB): what the server cannot send yet, it holds.
        connections.append((sock, conn))
    # Every request of every connection is encoded first and then written back to back, so
    # that the herd arrives within milliseconds, as a rollout's does.
    outgoing = []
    for sock, conn in connections:
        for _ in range(args.streams):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(
                stream,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":authority", args.address),
                    (":path", "/imageservice.v1.ImageService/GetImage"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("grpc-timeout", "30S"),
                ],
            )
            conn.send_data(stream, body, end_stream=True)
        outgoing.append((sock, conn.data_to_send()))
    for sock, data in outgoing:
        sock.sendall(data)
    time.sleep(args.pause)
    peak_seen = 0.0
    outcomes = {}
    answer_bytes = 0
    pending = {id(conn): args.streams for _, conn in connections}
    started = time.monotonic()
    while any(pending.values()) and time.monotonic() - started < 120:
        for sock, conn in connections:
            if not pending[id(conn)]:
                continue
            sock.settimeout(0.001)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                pending[id(conn)] = 0
                continue
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    answer_bytes += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                    headers = dict(event.headers)
                    code = headers.get(b"grpc-status")
                    if code is not None:
                        outcomes[code.decode()] = outcomes.get(code.decode(), 0) + 1
                        pending[id(conn)] -= 1
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        peak_seen = max(peak_seen, status(args.pid)["VmRSS"])
    after_read = status(args.pid)
    for sock, _ in connections:
        sock.close()
    time.sleep(1)
    closed = status(args.pid)
    print(
        f"herd: {args.connections * args.streams} GetImage over {args.connections} connections: "
        f"outcomes {outcomes}, {answer_bytes} answer bytes; resident before {before['VmRSS']:.1f} MiB, "
        f"peak {closed['VmHWM']:.1f} MiB, after every answer was read {after_read['VmRSS']:.1f} MiB, "
        f"1 s after the connections closed {closed['VmRSS']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
