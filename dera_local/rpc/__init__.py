"""Models on other machines over llama.cpp's RPC backend: endpoints and
whether an address is loopback (`endpoints`), where layers go (`placement`), a lost
worker as one error (`faults`), and `dera-local worker` (`worker`).
"""
