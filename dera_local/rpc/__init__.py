"""Models on other machines over llama.cpp's RPC backend: endpoints (`endpoints`,
`loopback`), where layers go (`placement`), a lost worker as one error (`faults`),
the placement report (`report`), and `dera-local worker` (`worker`).
"""
