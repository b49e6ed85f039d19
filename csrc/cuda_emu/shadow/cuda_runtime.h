// Emulator stand-in for <cuda_runtime.h> (csrc/cuda_emu/README: only what csrc/cuda uses).
#pragma once
#include "../cuda_emu.h"
