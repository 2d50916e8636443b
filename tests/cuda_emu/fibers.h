// Cooperative threads for the host emulation of CUDA kernels (tests/cuda_emu/kernels_emu.cpp).
//
// Every emulated GPU thread of a launch is a fiber: its own stack, switched to and from in user
// space, all of them on the one OS thread that runs the launch. A fiber runs until it waits (a
// barrier, an mbarrier phase) or returns, then the next ready fiber runs. So an emulated block
// of 256 threads costs one core, where one OS thread per emulated thread made 256 threads
// contend for the machine's cores in futex waits (and several test processes multiplied that),
// and a wait that can never end is seen at once (no fiber ready while some still wait) and
// reported as the hang it would be on a GPU, instead of being found by a timeout.
//
// The schedule is deterministic, and chosen to expose missing barriers in the value checks:
// - a barrier releases its threads in ascending thread order in even generations and in
//   descending order in odd ones, so for any two threads each runs its part between two
//   barriers both before and after the other's, across the generations of a loop;
// - the blocks of a cluster run by priority: after each cluster barrier one block runs as far
//   as it can (until all of its threads wait) before the next one runs, the order of the blocks
//   reversed every other cluster barrier. A block that writes into another's shared memory
//   before that one is done with it (a copy issued one barrier too early) therefore always
//   changes what the other reads;
// - ML_EMU_SCHEDULE_SEED=S (S != 0) replaces both orders by random permutations drawn from S
//   (tests/cuda_emu/test_cuda_emu.py's random cases use one seed per case).
//
// Built with ThreadSanitizer each fiber is a TSan thread (__tsan_switch_to_fiber without
// synchronisation), so only the orderings the GPU gives are seen: __syncthreads, __syncwarp and
// the cluster barrier order the memory of the threads they join (release on arrival, acquire on
// leaving, on a sync object per generation parity so that a fast thread's next arrival does not
// order a slow thread's earlier work), shuffles order nothing, an mbarrier phase orders its
// arrivals and completed copies before its waiters. The scheduler's own bookkeeping is hidden
// from TSan. Built with AddressSanitizer every stack switch is announced to it.
#pragma once

#include <sys/mman.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif
#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
}
#endif

namespace emu {
namespace fib {

// ------------------------------------------------------------------------------------------
// Context switch: on x86-64 the callee-saved registers, MXCSR and the x87 control word are
// pushed on the old stack, the stack pointer swapped, and the same popped from the new one (a
// user-space switch of a few nanoseconds); elsewhere ucontext.
// ------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void ml_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl ml_emu_switch
  .type ml_emu_switch, @function
ml_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ml_emu_switch, .-ml_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
// A context that starts entry() on the stack [base, base + bytes): the frame ml_emu_switch pops
// (control words, six registers, the return address = entry), placed so that entry starts
// with the stack aligned as after a call.
inline void context_init(Context& c, unsigned char* base, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + bytes) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                     // entry's return address: none
  s[-2] = reinterpret_cast<uint64_t>(entry);     // popped by ret
  for (int k = 3; k <= 8; ++k) s[-k] = 0;        // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  s[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  c.sp = &s[-9];
}
// Reads `to` before the sanitizers are told of the switch: from then on, memory accesses are
// the new fiber's.
struct Target {
  void* sp;
};
inline Target target_of(Context& to) { return Target{to.sp}; }
inline void context_switch(Context& from, Target to) { ml_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void context_init(Context& c, unsigned char* base, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
struct Target {
  ucontext_t* uc;
};
inline Target target_of(Context& to) { return Target{&to.uc}; }
inline void context_switch(Context& from, Target to) { swapcontext(&from.uc, to.uc); }
#endif

// ------------------------------------------------------------------------------------------
// Fibers and the scheduler
// ------------------------------------------------------------------------------------------
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr size_t kStackBytes = 1 << 20;  // the sanitizers' frames are larger
#else
constexpr size_t kStackBytes = 256 << 10;
#endif
constexpr size_t kGuardBytes = 1 << 16;  // PROT_NONE below each stack: an overflow faults

struct Fiber {
  Context ctx;
  unsigned char* stack = nullptr;  // usable part, kStackBytes
  int id = 0;                      // index in the launch (rank * threads per block + tid)
  int rank = 0;                    // block in the cluster
  int tid = 0;                     // thread in the block
  bool done = false;
  const char* waits_on = nullptr;  // what it waits for while blocked (for the hang report)
  void* tsan = nullptr;
  void* asan_fake = nullptr;
};

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

struct Scheduler {
  std::vector<std::unique_ptr<Fiber>> fibers;  // the first nranks x threads run a launch
  std::deque<Fiber*> ready[8];      // by block rank
  int order[8] = {0, 1, 2, 3, 4, 5, 6, 7};  // block priority: ranks, first runs first
  int nranks = 1;
  int threads = 0;                  // per block
  int live = 0;
  Fiber main;                       // the launching context
  const void* main_stack = nullptr;
  size_t main_stack_bytes = 0;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;    // the kernel, called by every fiber
  void* body_arg = nullptr;
  void (*resume_hook)(const Fiber&) = nullptr;  // sets the per-thread globals of a fiber
  std::mt19937_64 rng;
  uint64_t seed = 0;                // ML_EMU_SCHEDULE_SEED; 0: the alternating orders
  char launch_sync = 0, done_sync = 0;  // TSan: launch -> every thread -> return to the host

  Scheduler() {
    const char* e = std::getenv("ML_EMU_SCHEDULE_SEED");
    seed = e != nullptr ? std::strtoull(e, nullptr, 10) : 0;
    rng.seed(seed);
  }
  ~Scheduler() = delete;  // a static that lives as long as the process (its fibers' stacks)
};

inline Scheduler& sched() {
  static Scheduler* s = new Scheduler();
  return *s;
}

// The scheduler's own reads and writes, hidden from ThreadSanitizer: they are the emulator's,
// not the kernel's, and are ordered by the one OS thread that runs them all.
struct Hidden {
#if defined(__SANITIZE_THREAD__)
  Hidden() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Hidden() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#else
  Hidden() = default;
#endif
  Hidden(const Hidden&) = delete;
};

inline void tsan_release(void* p) {
#if defined(__SANITIZE_THREAD__)
  __tsan_release(p);
#else
  (void)p;
#endif
}
inline void tsan_acquire(void* p) {
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(p);
#else
  (void)p;
#endif
}

inline Fiber* current() { return sched().cur; }

// The next fiber to run: the oldest ready one of the first block in priority order.
inline Fiber* pick() {
  Scheduler& s = sched();
  for (int k = 0; k < s.nranks; ++k) {
    std::deque<Fiber*>& q = s.ready[s.order[k]];
    if (!q.empty()) {
      Fiber* f = q.front();
      q.pop_front();
      return f;
    }
  }
  return nullptr;
}

[[noreturn]] inline void report_hang() {
  Scheduler& s = sched();
  std::map<std::string, int> waiting;
  const int n = s.nranks * s.threads;
  for (int k = 0; k < n; ++k) {
    const Fiber& f = *s.fibers[k];
    if (!f.done) ++waiting[f.waits_on != nullptr ? f.waits_on : "?"];
  }
  std::string msg = "a wait that never ends (a hang on a GPU):";
  for (const auto& [what, n] : waiting) msg += " " + std::to_string(n) + " threads in " + what + ";";
  int finished = 0;
  for (int k = 0; k < n; ++k) finished += s.fibers[k]->done ? 1 : 0;
  msg += " " + std::to_string(finished) + " returned";
  fail(msg.c_str());
}

// Switches from `from` (the running fiber or the host) to `to`; returns when `from` runs again.
// The bookkeeping is hidden from ThreadSanitizer; the switch itself is not inside the hidden
// part, so that a fiber that ends leaves with no ignore open (TSan reports that).
inline void switch_to(Fiber* from, Fiber* to) {
  Scheduler& s = sched();
  Target target;
  void* to_tsan = nullptr;
#if defined(__SANITIZE_ADDRESS__)
  const void* bottom = nullptr;
  size_t size = 0;
  void** fake = &from->asan_fake;
#endif
  {
    Hidden h;
    s.cur = to;
    target = target_of(to->ctx);
    to_tsan = to->tsan;
#if defined(__SANITIZE_ADDRESS__)
    bottom = to == &s.main ? s.main_stack : to->stack;
    size = to == &s.main ? s.main_stack_bytes : kStackBytes;
#endif
  }
#if defined(__SANITIZE_THREAD__)
  // 1 = __tsan_switch_to_fiber_no_sync: a switch orders nothing; barriers say what is ordered
  __tsan_switch_to_fiber(to_tsan, 1);
#else
  (void)to_tsan;
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake, bottom, size);
#endif
  context_switch(from->ctx, target);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr);
#endif
  Hidden h;
  if (from != &s.main && s.resume_hook != nullptr) s.resume_hook(*from);
}

// The running fiber, already queued where it will be woken from, waits: the next ready fiber
// runs (none: every fiber waits, the hang is reported).
inline void block(const char* what) {
  Fiber* me = current();
  me->waits_on = what;
  Fiber* next = pick();
  if (next == nullptr) report_hang();
  switch_to(me, next);
  me->waits_on = nullptr;
}

// Makes `fs` ready in the release order of generation `gen` (module comment).
inline void wake(std::vector<Fiber*>& fs, uint64_t gen) {
  Scheduler& s = sched();
  if (s.seed != 0) {
    std::shuffle(fs.begin(), fs.end(), s.rng);
  } else if (gen % 2 == 0) {
    std::sort(fs.begin(), fs.end(), [](const Fiber* a, const Fiber* b) { return a->id < b->id; });
  } else {
    std::sort(fs.begin(), fs.end(), [](const Fiber* a, const Fiber* b) { return a->id > b->id; });
  }
  for (Fiber* f : fs) s.ready[f->rank].push_back(f);
  fs.clear();
}

// The running fiber lets the ready ones before it run (it is queued itself).
inline void yield() {
  Fiber* me = current();
  Fiber* next = pick();
  if (next != me) switch_to(me, next);
}

// A barrier of `expected` threads (__syncthreads, __syncwarp, the cluster barrier).
struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t gen = 0;
  bool cluster = false;  // after a release the blocks' priorities change (module comment)
  std::vector<Fiber*> waiting;
  char sync[2] = {0, 0};  // TSan sync objects by generation parity

  void reset(int n, bool is_cluster = false) {
    expected = n;
    arrived = 0;
    gen = 0;
    cluster = is_cluster;
    waiting.clear();
    waiting.reserve(n);
  }
  // orders_memory: whether arriving releases and leaving acquires (false: a shuffle's wait)
  void wait(bool orders_memory, const char* what) {
    const uint64_t g = gen;
    if (orders_memory) tsan_release(&sync[g & 1]);
    {
      Hidden h;
      waiting.push_back(current());
      if (++arrived < expected) {
        block(what);
      } else {
        arrived = 0;
        ++gen;
        if (cluster) set_block_order(g);
        wake(waiting, g);
        yield();
      }
    }
    if (orders_memory) tsan_acquire(&sync[g & 1]);
  }
  static void set_block_order(uint64_t g) {
    Scheduler& s = sched();
    for (int k = 0; k < s.nranks; ++k) s.order[k] = g % 2 == 0 ? k : s.nranks - 1 - k;
    if (s.seed != 0) std::shuffle(s.order, s.order + s.nranks, s.rng);
  }
};

// A fiber's life: it runs the kernel once per launch it takes part in, and between launches
// waits where it switched away after its last one (so its stack and its ThreadSanitizer state
// are made once, and every call on its stack returns).
[[noreturn]] inline void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Scheduler& s = sched();
  Fiber* me = nullptr;
  {
    Hidden h;
    me = s.cur;
    if (s.resume_hook != nullptr) s.resume_hook(*me);
  }
  for (;;) {
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    {
      Hidden h;
      body = s.body;
      arg = s.body_arg;
    }
    tsan_acquire(&s.launch_sync);
    body(arg);
    tsan_release(&s.done_sync);
    Fiber* next = nullptr;
    {
      Hidden h;
      me->done = true;
      next = --s.live == 0 ? &s.main : pick();
      if (next == nullptr) report_hang();
    }
    switch_to(me, next);  // resumed by the next launch that needs this fiber
  }
}

// Runs body(arg) as every fiber of a launch of `nranks` blocks of `threads` threads, the
// fibers started in (rank, tid) order; returns when all have returned.
inline void run(int nranks, int threads, void (*body)(void*), void* arg) {
  Scheduler& s = sched();
  const int n = nranks * threads;
  while (static_cast<int>(s.fibers.size()) < n) {  // made once, for the largest launch
    auto f = std::make_unique<Fiber>();
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
    mprotect(m, kGuardBytes, PROT_NONE);
    f->stack = static_cast<unsigned char*>(m) + kGuardBytes;
#if defined(__SANITIZE_THREAD__)
    f->tsan = __tsan_create_fiber(0);
#endif
    context_init(f->ctx, f->stack, kStackBytes, fiber_main);
    s.fibers.push_back(std::move(f));
  }
#if defined(__SANITIZE_ADDRESS__)
  if (s.main_stack == nullptr) {
    pthread_attr_t attr;
    pthread_getattr_np(pthread_self(), &attr);
    void* addr = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    s.main_stack = addr;
    s.main_stack_bytes = size;
  }
#endif
#if defined(__SANITIZE_THREAD__)
  s.main.tsan = __tsan_get_current_fiber();
#endif
  s.nranks = nranks;
  s.threads = threads;
  s.body = body;
  s.body_arg = arg;
  s.live = n;
  for (int k = 0; k < nranks; ++k) {
    s.order[k] = k;
    s.ready[k].clear();
  }
  for (int k = 0; k < n; ++k) {
    Fiber& f = *s.fibers[k];
    f.id = k;
    f.rank = k / threads;
    f.tid = k % threads;
    f.done = false;
    f.waits_on = nullptr;
    s.ready[f.rank].push_back(&f);
  }
  tsan_release(&s.launch_sync);
  Fiber* first = pick();
  switch_to(&s.main, first);
  tsan_acquire(&s.done_sync);
  s.cur = nullptr;
}

}  // namespace fib
}  // namespace emu
