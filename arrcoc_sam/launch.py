"""`python -m arrcoc_sam.launch SCRIPT.py --optimizer sam --rho 0.05 ARGS...`: see arrcoc_sam.integrations.launch."""

from arrcoc_sam.integrations.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
