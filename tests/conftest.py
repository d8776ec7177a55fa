import os

# before anything imports triton (timm does): CPU runs execute the Triton kernels in the interpreter; a GPU
# run sets TRITON_INTERPRET=0 explicitly
os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
