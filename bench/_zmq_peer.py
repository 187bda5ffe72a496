"""The raw pyzmq peer of bench_remote.py: connects a DEALER to argv[1] and, until
an empty frame arrives, echoes frames up to 1 KiB and answers larger ones with
their length (8 bytes, little-endian). Frames are received with copy=False and
never touched: the loopback limit, with no work on the data."""

import os
import sys

import zmq


def main(addr: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    parent = os.getppid()
    try:
        while True:
            if not sock.poll(1000, zmq.POLLIN):
                if os.getppid() != parent:  # the benchmark is gone
                    return
                continue
            frame = sock.recv(copy=False)
            n = len(frame)
            if n == 0:
                return
            if n <= 1024:
                sock.send(frame, copy=False)
            else:
                sock.send(n.to_bytes(8, "little"))
            del frame
    finally:
        sock.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    main(sys.argv[1])
