/* Preloaded (LD_PRELOAD) by benchmarks/isa.py: CPUID answers as on this CPU less AVX-512, VNNI
 * and AMX, so that ONNX Runtime, PyTorch and numpy, which choose their kernels by CPUID, run
 * their AVX2 ones at native speed. Linux's ARCH_SET_CPUID makes every CPUID of the process (and
 * of the threads it starts later) raise SIGSEGV; the handler executes the real one with
 * faulting off for that thread, clears the feature bits and steps over the instruction.
 * Code that reads /proc/cpuinfo instead still sees the real flags. Where the masking cannot be
 * set up, the process exits at once rather than run unmasked under a masked label. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static long set_cpuid(unsigned long allowed) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, allowed); }

static void answer(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    set_cpuid(1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA; EDX: AVX_VNNI_INT8, AVX_NE_CONVERT,
         * AMX_COMPLEX, AVX_VNNI_INT16, AVX10 */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        r[3] &= ~(BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19));
    } else if (leaf == 0x24) { /* AVX10's version and vector lengths */
        r[0] = r[1] = r[2] = r[3] = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *raw) {
    greg_t *reg = ((ucontext_t *)raw)->uc_mcontext.gregs;
    /* A faulting CPUID arrives as SI_KERNEL (a general-protection fault) at a mapped RIP; any
     * other SIGSEGV is a real fault, which the default action now reports where it happened. */
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t r[4];
    answer((uint32_t)reg[REG_RAX], (uint32_t)reg[REG_RCX], r);
    reg[REG_RAX] = r[0];
    reg[REG_RBX] = r[1];
    reg[REG_RCX] = r[2];
    reg[REG_RDX] = r[3];
    reg[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    if (sigaction(SIGSEGV, &action, 0) != 0 || set_cpuid(0) != 0) {
        static const char message[] = "avx2_only: cannot make CPUID fault here; not running\n";
        (void)!write(2, message, sizeof message - 1);
        _exit(1);
    }
}
