// Emulator stand-in: no device to guard (csrc/cuda_emu/cuda_emu.h).
#pragma once
#include "../../../cuda_emu.h"
