// The process-group half of octet's distributed training, written against torch's c10d.
// Every function catches what c10d throws and copies the message into `err`, so no C++
// exception crosses into Rust; 0 means success.
#include "shim.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

void set_error(char* err, size_t len, const char* msg) {
  if (err == nullptr || len == 0) {
    return;
  }
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

// Runs `f`, turning any exception into a message and -1.
template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return -1;
}

c10::intrusive_ptr<c10d::Backend> make_gloo(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world,
    std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  // As torch.distributed does: GLOO_SOCKET_IFNAME names the interface, else the address
  // this host's name resolves to (loopback when it resolves to nothing).
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname != nullptr && *ifname != '\0') {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
}

}  // namespace

extern "C" {

// 1 when this build can make NCCL groups.
int octet_dist_has_nccl() {
#ifdef OCTET_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// A process group of `world` ranks. `file` non-empty: a FileStore at that path; otherwise a
// TCPStore at host:port, served by this process when `serve_store` is 1. The store is
// wrapped in a PrefixStore named after `prefix` so that a restarted attempt never reads the
// keys of the one before. `backend`: 0 Gloo, 1 NCCL.
OctetGroup* octet_dist_new(
    int backend,
    const char* file,
    const char* host,
    int port,
    int serve_store,
    int rank,
    int world,
    const char* prefix,
    long long timeout_ms,
    char* err,
    size_t err_len) {
  OctetGroup* out = nullptr;
  guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store;
    if (file != nullptr && *file != '\0') {
      store = c10::make_intrusive<c10d::FileStore>(file, world);
      store->setTimeout(timeout);
    } else {
      c10d::TCPStoreOptions o;
      o.port = static_cast<std::uint16_t>(port);
      o.isServer = serve_store != 0;
      o.numWorkers = world;
      // The ranks meet in the process group's own rendezvous through the store's keys; the
      // server's wait for its clients adds nothing (and its count was seen stuck here).
      o.waitWorkers = false;
      o.useLibUV = false;
      o.timeout = timeout;
      store = c10::make_intrusive<c10d::TCPStore>(host, o);
    }
    store = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
    c10::intrusive_ptr<c10d::Backend> b;
    if (backend == 1) {
      b = octet_make_nccl(store, rank, world, timeout);
    } else {
      b = make_gloo(store, rank, world, timeout);
    }
    out = new OctetGroup{b, timeout};
  });
  return out;
}

void octet_dist_free(OctetGroup* g) {
  delete g;
}

// In-place all-reduce of one dense tensor: `op` 0 sum, 1 max.
int octet_dist_all_reduce(OctetGroup* g, at::Tensor* t, int op, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    auto work = g->backend->allreduce(ts, o);
    if (!work->wait(g->timeout)) {
      throw std::runtime_error("all-reduce did not complete");
    }
  });
}

// In-place broadcast of one dense tensor from rank `root`.
int octet_dist_broadcast(OctetGroup* g, at::Tensor* t, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    auto work = g->backend->broadcast(ts, o);
    if (!work->wait(g->timeout)) {
      throw std::runtime_error("broadcast did not complete");
    }
  });
}

}  // extern "C"

#ifndef OCTET_WITH_NCCL
c10::intrusive_ptr<c10d::Backend> octet_make_nccl(
    const c10::intrusive_ptr<c10d::Store>&,
    int,
    int,
    std::chrono::milliseconds) {
  throw std::runtime_error(
      "this octet was built against a libtorch without CUDA, so it has no NCCL; "
      "use --dist-backend gloo");
}
#endif
