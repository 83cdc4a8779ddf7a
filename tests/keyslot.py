"""Redis Cluster's key -> slot mapping (CRC16/XMODEM of the hash tag, mod 16384), as the
cluster specification defines it: to check that every script call stays on one slot."""

from __future__ import annotations

SLOTS = 16384


def crc16(data: bytes) -> int:
    """CRC16/XMODEM (polynomial 0x1021, initial value 0), the CRC Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hashed_part(key: bytes) -> bytes:
    """What Redis hashes: between the first '{' and the next '}', if that is not empty; else the key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    return crc16(hashed_part(key.encode() if isinstance(key, str) else key)) % SLOTS
