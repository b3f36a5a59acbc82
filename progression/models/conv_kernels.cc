// KxKxK (K = 3 or 1) 'SAME' stride-1 float32 convolution kernels, kernel-2 stride-2
// down/upsampling kernels and a fused silu(x * scale + shift) (further down), for XLA:CPU,
// called through the XLA FFI.
//
// XLA:CPU's convolutions run our thin 3D layers (8-64 channels) at 20-100 GFLOP/s and its
// kernel gradients at 20-80; these direct kernels, written for channels-last data and small
// channel counts, run at 100-210 GFLOP/s on the 2-core AVX-512 machines we train on
// (experiments/benchmark.py). Built and loaded by progression/models/conv_kernels.py, which
// compiles this file once per machine with the host's instruction set.
//
// Layouts (row-major): input [B, X, Y, Z, Cin], kernel [K, K, K, Cin, Cout] indexed
// [kx, ky, kz, ci, co] like flax's nn.Conv (cross-correlation), output [B, X, Y, Z, Cout];
// with h = K / 2 (1 for the 3x3x3 convolutions, 0 for the pointwise ones, a matmul over
// channels such as the U-Net's 1x1x1 skip projections):
//   forward:      out[b,x,y,z,co] = sum_{k,ci} in[b, x+kx-h, y+ky-h, z+kz-h, ci] * w[k,ci,co]
//   kernel grad:  dw[k,ci,co] = sum_{b,x,y,z} in[b, x+kx-h, y+ky-h, z+kz-h, ci] * dy[b,x,y,z,co]
// (zero outside the grid). The input gradient is the forward kernel applied to dy with the
// flipped kernel, in/out channels swapped (done by the caller).
//
// Vectorisation: output channels in 8-float vectors (Cout a multiple of 8, up to 64), a
// register block of consecutive z positions (forward) or input channels (kernel gradient),
// each scalar broadcast once per block. Threads: (batch, x) planes are handed out one at a
// time to the calling thread and to tasks on XLA's intra-op pool; the caller waits only for
// planes already taken, so a busy pool (another device's program) cannot deadlock it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 Load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

struct Dims {
  int64_t b, x, y, z, cin, cout;
};

// Runs body(unit) for every unit in [0, units) on the calling thread and workers - 1 pool tasks.
template <typename Body>
void ParallelUnits(ffi::ThreadPool& pool, int64_t units, int workers, Body body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  // Shared: a task the pool starts after the last unit is done still reads the counter.
  auto state = std::make_shared<State>();
  auto run = [state, units, body]() {
    for (int64_t unit; (unit = state->next.fetch_add(1)) < units;) {
      body(unit);
      state->done.fetch_add(1);
    }
  };
  for (int i = 1; i < workers; ++i) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (state->done.load() < units) std::this_thread::yield();
}

int Workers(ffi::ThreadPool& pool, int64_t units) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), units)));
}

// Calls row(kx, ky, r) for the (x, y) neighbours (x + kx - K/2, y + ky - K/2) of row (b, x, y)
// that lie inside the grid, r = the index of that row among the B*X*Y rows.
template <int K, typename Fn>
inline void ForNeighbourRows(const Dims& d, int64_t b, int64_t x, int64_t y, Fn row) {
  for (int kx = 0; kx < K; ++kx) {
    const int64_t xi = x + kx - K / 2;
    if (xi < 0 || xi >= d.x) continue;
    for (int ky = 0; ky < K; ++ky) {
      const int64_t yi = y + ky - K / 2;
      if (yi >= 0 && yi < d.y) row(kx, ky, (b * d.x + xi) * d.y + yi);
    }
  }
}

// Covers [begin, end) with calls block(std::integral_constant<int, B>(), i): blocks of
// kBlock, then at most one each of 8, 4 and 2 (those smaller than kBlock), then single steps.
template <int kBlock, typename Fn>
inline void Blocked(int64_t begin, int64_t end, Fn block) {
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) block(std::integral_constant<int, kBlock>(), i);
  if constexpr (kBlock > 8) {
    if (i + 8 <= end) block(std::integral_constant<int, 8>(), i), i += 8;
  }
  if constexpr (kBlock > 4) {
    if (i + 4 <= end) block(std::integral_constant<int, 4>(), i), i += 4;
  }
  if constexpr (kBlock > 2) {
    if (i + 2 <= end) block(std::integral_constant<int, 2>(), i), i += 2;
  }
  for (; i < end; ++i) block(std::integral_constant<int, 1>(), i);
}

// ---- register blocks ----------------------------------------------------------------------

// acc[n][:] += sum_ci src[n * step + ci] * tap[ci * 8 NV + (0 .. 8 NV - 1)], n < ZB: each
// input value broadcast once against the NV weight vectors of its input channel.
template <int NV, int ZB>
inline void AccumulateTap(v8 (&acc)[ZB][NV], const float* __restrict src, int64_t step,
                          const float* __restrict tap, int64_t cin) {
  for (int64_t ci = 0; ci < cin; ++ci) {
    v8 wv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) wv[v] = Load(tap + ci * NV * 8 + 8 * v);
#pragma GCC unroll 16
    for (int n = 0; n < ZB; ++n) {
      const float s = src[n * step + ci];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[n][v] += s * wv[v];
    }
  }
}

template <int NV, int ZB>
inline void ZeroBlock(v8 (&acc)[ZB][NV]) {
#pragma GCC unroll 16
  for (int n = 0; n < ZB; ++n)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[n][v] = v8{};
}

// dst[n * step + (0 .. 8 NV - 1)] = acc[n][:].
template <int NV, int ZB>
inline void StoreBlock(const v8 (&acc)[ZB][NV], float* __restrict dst, int64_t step) {
#pragma GCC unroll 16
  for (int n = 0; n < ZB; ++n)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Store(dst + n * step + 8 * v, acc[n][v]);
}

// ---- forward ------------------------------------------------------------------------------

// Output positions z0 .. z0+ZB-1 of row (b, x, y), all NV*8 output channels. CHECK: some kz
// taps fall outside [0, Z) (only used with ZB == 1 at the two ends of a row).
template <int K, int NV, int ZB, bool CHECK>
inline void ForwardRow(const float* __restrict in, const float* __restrict w,
                       float* __restrict out, const Dims& d, int64_t b, int64_t x, int64_t y,
                       int64_t z0) {
  constexpr int kCout = NV * 8;
  const int64_t cin = d.cin;
  v8 acc[ZB][NV];
  ZeroBlock(acc);
  // The neighbour rows spelled out rather than through ForNeighbourRows: the accumulators
  // stay out of a lambda capture in the hottest loop (through a lambda, the forward's z
  // blocks measured 1.4x slower with GCC 12, see ForwardPlane).
  for (int kx = 0; kx < K; ++kx) {
    const int64_t xi = x + kx - K / 2;
    if (xi < 0 || xi >= d.x) continue;
    for (int ky = 0; ky < K; ++ky) {
      const int64_t yi = y + ky - K / 2;
      if (yi < 0 || yi >= d.y) continue;
      const float* row = in + ((b * d.x + xi) * d.y + yi) * d.z * cin;
      for (int kz = 0; kz < K; ++kz) {
        const int64_t zs = z0 + kz - K / 2;
        if (CHECK && (zs < 0 || zs >= d.z)) continue;
        AccumulateTap(acc, row + zs * cin, cin, w + ((kx * K + ky) * K + kz) * cin * kCout, cin);
      }
    }
  }
  StoreBlock(acc, out + (((b * d.x + x) * d.y + y) * d.z + z0) * kCout, kCout);
}

// Register block: ~16-24 accumulators of 8 floats.
template <int NV>
constexpr int kForwardBlock = NV == 1 ? 16 : NV == 2 ? 12 : NV <= 4 ? 24 / NV : 3;

template <int K, int NV>
void ForwardPlane(const float* in, const float* w, float* out, const Dims& d, int64_t b,
                  int64_t x) {
  // Positions [h, Z - h) have every kz tap inside the row (h = K / 2); the h at each end
  // are checked.
  constexpr int h = K / 2;
  for (int64_t y = 0; y < d.y; ++y) {
    if (h) ForwardRow<K, NV, 1, true>(in, w, out, d, b, x, y, 0);
    if (d.z <= h) continue;
    // Spelled out rather than through Blocked, which cost the 8-channel forward 1.4x here
    // (GCC 12).
    constexpr int kBlock = kForwardBlock<NV>;
    int64_t z = h;
    const int64_t end = d.z - h;
    for (; z + kBlock <= end; z += kBlock)
      ForwardRow<K, NV, kBlock, false>(in, w, out, d, b, x, y, z);
    if constexpr (kBlock > 8) {
      if (z + 8 <= end) ForwardRow<K, NV, 8, false>(in, w, out, d, b, x, y, z), z += 8;
    }
    if constexpr (kBlock > 4) {
      if (z + 4 <= end) ForwardRow<K, NV, 4, false>(in, w, out, d, b, x, y, z), z += 4;
    }
    if constexpr (kBlock > 2) {
      if (z + 2 <= end) ForwardRow<K, NV, 2, false>(in, w, out, d, b, x, y, z), z += 2;
    }
    for (; z < end; ++z) ForwardRow<K, NV, 1, false>(in, w, out, d, b, x, y, z);
    if (h) ForwardRow<K, NV, 1, true>(in, w, out, d, b, x, y, end);
  }
}

// ---- kernel gradient ----------------------------------------------------------------------

// Adds sum_{n < count} src[n * src_step + ci0 .. ci0+CB-1] * dy[n * dy_step + (0 .. 8 NV - 1)]
// to tap[ci * tap_step + (0 .. 8 NV - 1)] (the steps: Cin and Cout along a row, twice that for
// every other voxel; dy and tap may start at a later output channel).
template <int NV, int CB>
inline void KernelGradBlock(const float* __restrict src, int64_t src_step,
                            const float* __restrict dy, int64_t dy_step, float* __restrict tap,
                            int64_t tap_step, int64_t ci0, int64_t count) {
  v8 acc[CB][NV];
#pragma GCC unroll 16
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[c][v] = v8{};
  for (int64_t n = 0; n < count; ++n) {
    v8 g[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) g[v] = Load(dy + n * dy_step + 8 * v);
    const float* in = src + n * src_step + ci0;
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) {
      const float s = in[c];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[c][v] += s * g[v];
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < CB; ++c)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* p = tap + (ci0 + c) * tap_step + 8 * v;
      Store(p, Load(p) + acc[c][v]);
    }
}

template <int NV>
constexpr int kGradBlock = NV == 1 ? 16 : NV == 2 ? 8 : NV <= 4 ? 6 : 2;

// Adds sum_n src[n * src_step + ci] * dy[n * dy_step + co] to tap[ci, co] for all Cin x 8 NV,
// in blocks of input channels.
template <int NV>
inline void KernelGradRun(const float* src, int64_t src_step, const float* dy, int64_t dy_step,
                          float* tap, int64_t cin, int64_t count) {
  Blocked<kGradBlock<NV>>(0, cin, [&](auto block, int64_t c) {
    KernelGradBlock<NV, decltype(block)::value>(src, src_step, dy, dy_step, tap, 8 * NV, c,
                                                count);
  });
}

// Adds the kernel gradient of the output plane (b, x) to dw ([K^3, Cin, Cout]).
template <int K, int NV>
void KernelGradPlane(const float* in, const float* dy, float* dw, const Dims& d, int64_t b,
                     int64_t x) {
  constexpr int kCout = NV * 8;
  const int64_t cin = d.cin;
  for (int64_t y = 0; y < d.y; ++y) {
    const float* row_dy = dy + ((b * d.x + x) * d.y + y) * d.z * kCout;
    ForNeighbourRows<K>(d, b, x, y, [&](int kx, int ky, int64_t r) {
      const float* row_in = in + r * d.z * cin;
      for (int kz = 0; kz < K; ++kz) {
        // Output z whose input z + shift lies inside [0, Z).
        const int64_t shift = kz - K / 2;
        const int64_t zlo = std::max<int64_t>(0, -shift), zhi = std::min(d.z, d.z - shift);
        float* tap = dw + ((kx * K + ky) * K + kz) * cin * kCout;
        KernelGradRun<NV>(row_in + (zlo + shift) * cin, cin, row_dy + zlo * kCout, kCout, tap,
                          cin, zhi - zlo);
      }
    });
  }
}

// ---- 2x resampling: kernel 2, stride 2 -----------------------------------------------------
//
// On a coarse grid [B, X, Y, Z] and its fine grid [B, 2X, 2Y, 2Z], with the 8 offsets
// o = (i, j, k) in {0, 1}^3 (tap index (i * 2 + j) * 2 + k of a [2, 2, 2, Cin, Cout] kernel):
//   down (fine -> coarse):  out[X, co] = sum_{o, ci} in[2X + o, ci] * w[o, ci, co]
//   up (coarse -> fine):    out[2X + o, co] = sum_ci in[X, ci] * w[o, ci, co]
// and their kernel gradients dw[o, ci, co] = sum_X in[2X + o, ci] * dy[X, co] (down) and
// sum_X in[X, ci] * dy[2X + o, co] (up). Each is the other's input gradient with the kernel's
// channel axes swapped (done by the caller). Work is split over coarse (b, X) planes.

// Down: coarse positions z0 .. z0+ZB-1 of coarse row (b, x, y); d holds the coarse grid.
template <int NV, int ZB>
inline void DownRow(const float* __restrict in, const float* __restrict w,
                    float* __restrict out, const Dims& d, int64_t b, int64_t x, int64_t y,
                    int64_t z0) {
  constexpr int kCout = NV * 8;
  const int64_t cin = d.cin;
  v8 acc[ZB][NV];
  ZeroBlock(acc);
  for (int o = 0; o < 8; ++o) {
    const int i = o >> 2, j = (o >> 1) & 1, k = o & 1;
    const float* src = in + (((b * 2 * d.x + 2 * x + i) * 2 * d.y + 2 * y + j) * 2 * d.z +
                             2 * z0 + k) * cin;
    AccumulateTap(acc, src, 2 * cin, w + o * cin * kCout, cin);
  }
  StoreBlock(acc, out + (((b * d.x + x) * d.y + y) * d.z + z0) * kCout, kCout);
}

// Up: the fine outputs of coarse positions z0 .. z0+ZB-1 of coarse row (b, x, y), one
// offset at a time.
template <int NV, int ZB>
inline void UpRow(const float* __restrict in, const float* __restrict w, float* __restrict out,
                  const Dims& d, int64_t b, int64_t x, int64_t y, int64_t z0) {
  constexpr int kCout = NV * 8;
  const int64_t cin = d.cin;
  const float* src = in + (((b * d.x + x) * d.y + y) * d.z + z0) * cin;
  for (int o = 0; o < 8; ++o) {
    const int i = o >> 2, j = (o >> 1) & 1, k = o & 1;
    v8 acc[ZB][NV];
    ZeroBlock(acc);
    AccumulateTap(acc, src, cin, w + o * cin * kCout, cin);
    StoreBlock(acc, out + (((b * 2 * d.x + 2 * x + i) * 2 * d.y + 2 * y + j) * 2 * d.z +
                           2 * z0 + k) * kCout, 2 * kCout);
  }
}

template <bool kUp, int NV>
void ResamplePlane(const float* in, const float* w, float* out, const Dims& d, int64_t b,
                   int64_t x) {
  for (int64_t y = 0; y < d.y; ++y) {
    Blocked<kForwardBlock<NV>>(0, d.z, [&](auto block, int64_t z) {
      constexpr int kZB = decltype(block)::value;
      if constexpr (kUp) {
        UpRow<NV, kZB>(in, w, out, d, b, x, y, z);
      } else {
        DownRow<NV, kZB>(in, w, out, d, b, x, y, z);
      }
    });
  }
}

// Adds the kernel gradient ([8, Cin, Cout]) of coarse plane (b, x) to dw.
template <bool kUp, int NV>
void ResampleKernelGradPlane(const float* in, const float* dy, float* dw, const Dims& d,
                             int64_t b, int64_t x) {
  constexpr int kCout = NV * 8;
  const int64_t cin = d.cin;
  for (int64_t y = 0; y < d.y; ++y) {
    const int64_t coarse = ((b * d.x + x) * d.y + y) * d.z;
    for (int o = 0; o < 8; ++o) {
      const int i = o >> 2, j = (o >> 1) & 1, k = o & 1;
      const int64_t fine = ((b * 2 * d.x + 2 * x + i) * 2 * d.y + 2 * y + j) * 2 * d.z + k;
      // The fine grid's array is read at every other z position.
      const float* src = kUp ? in + coarse * cin : in + fine * cin;
      const float* g = kUp ? dy + fine * kCout : dy + coarse * kCout;
      const int64_t src_step = kUp ? cin : 2 * cin, dy_step = kUp ? 2 * kCout : kCout;
      KernelGradRun<NV>(src, src_step, g, dy_step, dw + o * cin * kCout, cin, d.z);
    }
  }
}

// Calls fn(std::integral_constant<int, NV>) for cout = 8 * NV, NV in 1..8 (the handlers
// check SupportedCout(cout) before any thread starts).
template <typename Fn>
void DispatchCout(int64_t cout, Fn fn) {
  switch (cout) {
    case 8: return fn(std::integral_constant<int, 1>());
    case 16: return fn(std::integral_constant<int, 2>());
    case 24: return fn(std::integral_constant<int, 3>());
    case 32: return fn(std::integral_constant<int, 4>());
    case 40: return fn(std::integral_constant<int, 5>());
    case 48: return fn(std::integral_constant<int, 6>());
    case 56: return fn(std::integral_constant<int, 7>());
    case 64: return fn(std::integral_constant<int, 8>());
  }
}

bool SupportedCout(int64_t cout) { return cout > 0 && cout <= 64 && cout % 8 == 0; }

// Calls fn(std::integral_constant<int, K>()) for kernel size K (checked: 1 or 3) and NV.
template <typename Fn>
void Dispatch(int64_t k, int64_t cout, Fn fn) {
  DispatchCout(cout, [&](auto nv) {
    if (k == 1) return fn(std::integral_constant<int, 1>(), nv);
    fn(std::integral_constant<int, 3>(), nv);
  });
}

// Whether dims [K, K, K, Cin, Cout] describe a kernel these functions compute.
bool SupportedKernel(ffi::Span<const int64_t> k, int64_t cin) {
  return k.size() == 5 && (k[0] == 1 || k[0] == 3) && k[1] == k[0] && k[2] == k[0] &&
         k[3] == cin && SupportedCout(k[4]);
}

// out[0 .. size) = the sum over work units p in [0, planes) (the grid's (b, x) planes, or
// chunks of its voxels; `voxels` in all) of what add_plane(acc, p) adds to a zeroed acc. The
// units go in kChunks fixed contiguous chunks, each summed into its own accumulator and the
// accumulators added in chunk order: the same bits whichever thread runs which chunk
// (training must be reproducible), and no atomics in the inner loops. Zeroing and adding
// the accumulators run on the pool too: for a 64 x 64 kernel on an 8^3 grid they are 7 MB,
// as much time as the products when one thread did them.
template <typename Fn>
void SumOverPlanes(ffi::ThreadPool& pool, int64_t planes, int64_t voxels, int64_t size,
                   float* out, Fn add_plane) {
  constexpr int64_t kChunks = 16;
  // At least ~256 voxels a chunk: on small grids the accumulators, not the products, cost.
  const int64_t chunks = std::max<int64_t>(1, std::min({planes, kChunks, voxels / 256}));
  std::unique_ptr<float[]> partial(new float[chunks * size]);
  float* parts = partial.get();
  ParallelUnits(pool, chunks, Workers(pool, chunks), [&](int64_t chunk) {
    std::memset(parts + chunk * size, 0, sizeof(float) * size);
    for (int64_t p = chunk * planes / chunks; p < (chunk + 1) * planes / chunks; ++p)
      add_plane(parts + chunk * size, p);
  });
  // Slices of out, each summed over the chunks in order; on the calling thread alone when
  // the sums are small (a pool round trip costs more than ~64K additions).
  const int64_t slices = chunks * size < (1 << 16) ? 1 : kChunks;
  ParallelUnits(pool, slices, Workers(pool, slices), [&](int64_t slice) {
    const int64_t begin = slice * size / slices, end = (slice + 1) * size / slices;
    std::memcpy(out + begin, parts + begin, sizeof(float) * (end - begin));
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t i = begin; i < end; ++i) out[i] += parts[c * size + i];
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y) {
  if (x.dimensions().size() != 5 || kernel.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("conv forward: expects rank-5 x and kernel");
  const auto xs = x.dimensions();
  const auto ks = kernel.dimensions();
  const Dims d{xs[0], xs[1], xs[2], xs[3], xs[4], ks[4]};
  if (!SupportedKernel(ks, d.cin))
    return ffi::Error::InvalidArgument(
        "conv forward: kernel must be [K, K, K, Cin, Cout], K 1 or 3, Cout a multiple of 8 <= 64");
  const float* in = x.typed_data();
  const float* w = kernel.typed_data();
  float* out = y->typed_data();
  const int64_t units = d.b * d.x;
  ParallelUnits(pool, units, Workers(pool, units), [&](int64_t unit) {
    Dispatch(ks[0], d.cout, [&](auto k, auto nv) {
      ForwardPlane<decltype(k)::value, decltype(nv)::value>(in, w, out, d, unit / d.x,
                                                              unit % d.x);
    });
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  if (x.dimensions().size() != 5 || dy.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("conv kernel grad: expects rank-5 x and dy");
  const auto xs = x.dimensions();
  const auto gs = dy.dimensions();
  const auto ks = dw->dimensions();
  const Dims d{xs[0], xs[1], xs[2], xs[3], xs[4], gs[4]};
  if (gs[0] != d.b || gs[1] != d.x || gs[2] != d.y || gs[3] != d.z)
    return ffi::Error::InvalidArgument("conv kernel grad: x and dy grids differ");
  if (!SupportedKernel(ks, d.cin) || ks[4] != d.cout)
    return ffi::Error::InvalidArgument(
        "conv kernel grad: dw must be [K, K, K, Cin, Cout], K 1 or 3, Cout a multiple of 8 <= 64");
  const int64_t size = ks[0] * ks[0] * ks[0] * d.cin * d.cout;
  const float* in = x.typed_data();
  const float* g = dy.typed_data();
  const auto add_plane = [&](float* acc, int64_t p) {
    Dispatch(ks[0], d.cout, [&](auto k, auto nv) {
      KernelGradPlane<decltype(k)::value, decltype(nv)::value>(in, g, acc, d, p / d.x, p % d.x);
    });
  };
  SumOverPlanes(pool, d.b * d.x, d.b * d.x * d.y * d.z, size, dw->typed_data(), add_plane);
  return ffi::Error::Success();
}

// The coarse grid of a 2x resampling between `coarse` and `fine` arrays, or false when the
// fine grid is not exactly twice the coarse one.
bool CoarseDims(ffi::Span<const int64_t> coarse, ffi::Span<const int64_t> fine, Dims& d) {
  if (coarse.size() != 5 || fine.size() != 5 || fine[0] != coarse[0]) return false;
  for (int a = 1; a < 4; ++a)
    if (fine[a] != 2 * coarse[a]) return false;
  d.b = coarse[0], d.x = coarse[1], d.y = coarse[2], d.z = coarse[3];
  return true;
}

// Down (kUp false: x fine, y coarse) or up (x coarse, y fine) resampling.
template <bool kUp>
ffi::Error Resample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto ks = kernel.dimensions();
  Dims d{};
  if (!CoarseDims(kUp ? x.dimensions() : y->dimensions(),
                  kUp ? y->dimensions() : x.dimensions(), d))
    return ffi::Error::InvalidArgument("resample: the fine grid must be twice the coarse one");
  d.cin = x.dimensions()[4], d.cout = ks.size() == 5 ? ks[4] : 0;
  if (ks.size() != 5 || ks[0] != 2 || ks[1] != 2 || ks[2] != 2 || ks[3] != d.cin ||
      !SupportedCout(d.cout))
    return ffi::Error::InvalidArgument(
        "resample: kernel must be [2, 2, 2, Cin, Cout], Cout a multiple of 8 <= 64");
  const float* in = x.typed_data();
  const float* w = kernel.typed_data();
  float* out = y->typed_data();
  const int64_t units = d.b * d.x;
  ParallelUnits(pool, units, Workers(pool, units), [&](int64_t unit) {
    DispatchCout(d.cout, [&](auto nv) {
      ResamplePlane<kUp, decltype(nv)::value>(in, w, out, d, unit / d.x, unit % d.x);
    });
  });
  return ffi::Error::Success();
}

template <bool kUp>
ffi::Error ResampleKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const auto ks = dw->dimensions();
  Dims d{};
  if (!CoarseDims(kUp ? x.dimensions() : dy.dimensions(),
                  kUp ? dy.dimensions() : x.dimensions(), d))
    return ffi::Error::InvalidArgument(
        "resample kernel grad: the fine grid must be twice the coarse one");
  d.cin = x.dimensions()[4], d.cout = dy.dimensions()[4];
  if (ks.size() != 5 || ks[0] != 2 || ks[1] != 2 || ks[2] != 2 || ks[3] != d.cin ||
      ks[4] != d.cout || !SupportedCout(d.cout))
    return ffi::Error::InvalidArgument(
        "resample kernel grad: dw must be [2, 2, 2, Cin, Cout], Cout a multiple of 8 <= 64");
  const float* in = x.typed_data();
  const float* g = dy.typed_data();
  const auto add_plane = [&](float* acc, int64_t p) {
    DispatchCout(d.cout, [&](auto nv) {
      ResampleKernelGradPlane<kUp, decltype(nv)::value>(in, g, acc, d, p / d.x, p % d.x);
    });
  };
  SumOverPlanes(pool, d.b * d.x, d.b * d.x * d.y * d.z, 8 * d.cin * d.cout, dw->typed_data(),
                add_plane);
  return ffi::Error::Success();
}

// ---- silu(x * scale + shift) ----------------------------------------------------------------
//
// x [B, X, Y, Z, C] (C a multiple of 8, <= 64), scale and shift [B, C]: the GroupNorm + FiLM +
// SiLU of the U-Net's blocks as one pass (XLA:CPU recomputed the per-channel coefficients at
// every element, 8 ns each), and its gradient as one more.

typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 Splat(float s) { return v8{} + s; }

inline v8 Min(v8 a, v8 b) { return a < b ? a : b; }
inline v8 Max(v8 a, v8 b) { return a > b ? a : b; }

// exp(x) for x in float32's range: 2^n * p(r), n = round(x / ln 2), |r| <= ln(2) / 2, p a
// degree-7 polynomial (Cephes' expf coefficients): within 2 ulp of exp; clamped to
// [exp(-87.3), exp(88.3)].
inline v8 Exp(v8 x) {
  x = Min(Max(x, Splat(-87.3f)), Splat(88.3f));
  const v8 magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer.
  const v8 t = x * 1.44269504088896341f + magic;
  const v8 n = t - magic;
  const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v8i bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const v8i magic_bits = v8i{} + 0x4B400000;  // The bits of `magic`.
  const v8i exponent = (bits - magic_bits + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

inline v8 Sigmoid(v8 h) { return 1.0f / (1.0f + Exp(-h)); }

struct Rows {
  int64_t batch, voxels, channels;  // x viewed as [batch, voxels, channels]
};

Rows AsRows(ffi::Span<const int64_t> dims) {
  return {dims[0], dims[1] * dims[2] * dims[3], dims[4]};
}

constexpr int64_t kSiluChunks = 16;  // Fixed chunks of each batch element's voxels.

// Work unit `unit` of batch * kSiluChunks: batch element b, voxels [begin, end) of its chunk.
struct SiluUnit {
  int64_t b, begin, end;
};

SiluUnit UnitOf(const Rows& r, int64_t unit) {
  const int64_t b = unit / kSiluChunks, k = unit % kSiluChunks;
  return {b, k * r.voxels / kSiluChunks, (k + 1) * r.voxels / kSiluChunks};
}

template <int NV>
void SiluChunk(const float* x, const float* scale, const float* shift, float* out,
               const Rows& r, int64_t b, int64_t begin, int64_t end) {
  v8 a[NV], c[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = Load(scale + b * r.channels + 8 * v);
    c[v] = Load(shift + b * r.channels + 8 * v);
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t at = (b * r.voxels + i) * r.channels;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const v8 h = Load(x + at + 8 * v) * a[v] + c[v];
      Store(out + at + 8 * v, h * Sigmoid(h));
    }
  }
}

// dx, and adds this chunk's sums of dh * x and dh per channel (dh = dout * silu'(h)) to
// dscale and dshift.
template <int NV>
void SiluGradChunk(const float* x, const float* scale, const float* shift, const float* dout,
                   float* dx, float* dscale, float* dshift, const Rows& r, int64_t b,
                   int64_t begin, int64_t end) {
  v8 a[NV], c[NV], sa[NV], sc[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = Load(scale + b * r.channels + 8 * v);
    c[v] = Load(shift + b * r.channels + 8 * v);
    sa[v] = sc[v] = v8{};
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t at = (b * r.voxels + i) * r.channels;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const v8 xv = Load(x + at + 8 * v);
      const v8 h = xv * a[v] + c[v];
      const v8 s = Sigmoid(h);
      const v8 dh = Load(dout + at + 8 * v) * s * (1.0f + h * (1.0f - s));
      Store(dx + at + 8 * v, dh * a[v]);
      sa[v] += dh * xv;
      sc[v] += dh;
    }
  }
  for (int v = 0; v < NV; ++v) {
    Store(dscale + 8 * v, Load(dscale + 8 * v) + sa[v]);
    Store(dshift + 8 * v, Load(dshift + 8 * v) + sc[v]);
  }
}

bool SiluShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> scale,
                ffi::Span<const int64_t> shift) {
  return x.size() == 5 && scale.size() == 2 && shift.size() == 2 && scale[0] == x[0] &&
         scale[1] == x[4] && shift[0] == x[0] && shift[1] == x[4] && SupportedCout(x[4]);
}

ffi::Error ScaleShiftSilu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                          ffi::ResultBuffer<ffi::F32> out) {
  if (!SiluShapes(x.dimensions(), scale.dimensions(), shift.dimensions()))
    return ffi::Error::InvalidArgument(
        "scale_shift_silu: x [B, X, Y, Z, C] (C a multiple of 8 <= 64), scale and shift [B, C]");
  const Rows r = AsRows(x.dimensions());
  const int64_t units = r.batch * kSiluChunks;
  ParallelUnits(pool, units, Workers(pool, units), [&](int64_t unit) {
    const SiluUnit u = UnitOf(r, unit);
    DispatchCout(r.channels, [&](auto nv) {
      SiluChunk<decltype(nv)::value>(x.typed_data(), scale.typed_data(), shift.typed_data(),
                                     out->typed_data(), r, u.b, u.begin, u.end);
    });
  });
  return ffi::Error::Success();
}

ffi::Error ScaleShiftSiluGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                              ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dx,
                              ffi::ResultBuffer<ffi::F32> dscale,
                              ffi::ResultBuffer<ffi::F32> dshift) {
  if (!SiluShapes(x.dimensions(), scale.dimensions(), shift.dimensions()) ||
      dout.element_count() != x.element_count())
    return ffi::Error::InvalidArgument(
        "scale_shift_silu grad: x and dout [B, X, Y, Z, C] (C a multiple of 8 <= 64), scale "
        "and shift [B, C]");
  const Rows r = AsRows(x.dimensions());
  const int64_t c = r.channels, sums_size = 2 * r.batch * c;
  // The per-channel sums, dscale's then dshift's, added over fixed chunks of the voxels in a
  // fixed order like the kernel gradients' (reproducible bits).
  std::vector<float> sums(static_cast<size_t>(sums_size));
  const auto add_unit = [&](float* acc, int64_t unit) {
    const SiluUnit u = UnitOf(r, unit);
    DispatchCout(c, [&](auto nv) {
      SiluGradChunk<decltype(nv)::value>(
          x.typed_data(), scale.typed_data(), shift.typed_data(), dout.typed_data(),
          dx->typed_data(), acc + u.b * c, acc + (r.batch + u.b) * c, r, u.b, u.begin, u.end);
    });
  };
  SumOverPlanes(pool, r.batch * kSiluChunks, r.batch * r.voxels, sums_size, sums.data(),
                add_unit);
  std::memcpy(dscale->typed_data(), sums.data(), sizeof(float) * r.batch * c);
  std::memcpy(dshift->typed_data(), sums.data() + r.batch * c, sizeof(float) * r.batch * c);
  return ffi::Error::Success();
}

// Every handler takes the intra-op thread pool and two float32 arrays, and returns one.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// The SiLU handlers' common head: the thread pool, x, scale and shift.
auto SiluBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::Buffer<ffi::F32>>()   // scale
      .Arg<ffi::Buffer<ffi::F32>>();  // shift
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionConvKernelGrad, KernelGrad, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionDownForward, (Resample<false>), Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionUpForward, (Resample<true>), Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionDownKernelGrad, (ResampleKernelGrad<false>), Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionUpKernelGrad, (ResampleKernelGrad<true>), Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionScaleShiftSilu, ScaleShiftSilu,
                              SiluBinding().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ProgressionScaleShiftSiluGrad, ScaleShiftSiluGrad,
                              SiluBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dshift
