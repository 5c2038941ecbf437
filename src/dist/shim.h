// C interface between octet's Rust code and torch's c10d (see shim.cpp).
#pragma once
#include <cstddef>
#include <string>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

// One process group: the backend and the timeout every collective waits at most.
struct OctetGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

// Builds the NCCL backend (shim_nccl.cpp, compiled only against a CUDA libtorch).
c10::intrusive_ptr<c10d::Backend> octet_make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world,
    std::chrono::milliseconds timeout);
