#!/bin/bash
# Run one command on an emulated AVX2-only CPU: QEMU (TCG, no KVM) with an AMD EPYC-Rome CPU model,
# whose CPUID says AuthenticAMD, AVX2 and FMA, and no AVX-512, no AVX512-BF16, no AMX. torch, MKL and
# oneDNN read that CPUID, so they pick the kernels an AVX2-only AMD machine would (issue 32's
# machine); the env-variable stand-in of docs/performance.md only caps the ISA on the real CPU.
#
#   bench/avx2_guest.sh [--cpu MODEL] [--mem SIZE] -- COMMAND [ARG ...]
#
# COMMAND runs in the current folder, as root, with this machine's whole file tree shared into the
# guest (9p) and a fresh tmpfs on /tmp; its output comes back here and its exit status is ours.
# Emulation is slow (a float32 matmul about 5,000x slower than the Xeon it ran on), so give it small jobs,
# such as one test; its times are not speed figures. Debian only: the first run installs
# qemu-system-x86, busybox-static and a Debian kernel with apt-get (96 MB to fetch, 511 MB on disk).
set -euo pipefail
CPU=EPYC-Rome; MEM=16G
usage() { echo "bench/avx2_guest.sh: $1 (usage: bench/avx2_guest.sh [--cpu MODEL] [--mem SIZE] -- COMMAND [ARG ...])" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu|--mem) [ $# -ge 2 ] || usage "$1 needs a value"
                     if [ "$1" = --cpu ]; then CPU=$2; else MEM=$2; fi; shift 2 ;;
        --) shift; break ;;
        *) usage "unknown argument $1" ;;
    esac
done
[ $# -gt 0 ] || usage "no command given"

if ! command -v qemu-system-x86_64 >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 busybox-static linux-image-amd64 >/dev/null ||
        { echo "bench/avx2_guest.sh: installing qemu-system-x86, busybox-static and linux-image-amd64 failed (Debian, as root)" >&2; exit 1; }
fi
KERNEL=$(ls /boot/vmlinuz-* | sort -V | tail -1); KVER=${KERNEL#/boot/vmlinuz-}

# The job folder lives outside /tmp, which the guest covers with its own tmpfs.
WORK=$(mktemp -d /var/tmp/avx2_guest.XXXXXX); trap 'rm -rf "$WORK"' EXIT
{
    echo '#!/bin/bash'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys'
    echo "export PATH=$(printf %q "$PATH") HOME=$(printf %q "$HOME")"
    echo "cd $(printf %q "$PWD")"
    printf '%q ' "$@"; echo
    echo "echo \$? > $WORK/status"
} > "$WORK/job.sh"

# A minimal initramfs: busybox, the virtio and 9p modules, and an init that mounts this machine's
# root read-write, then runs the job in it and powers off.
mkdir -p "$WORK"/initrd/{bin,mods,newroot,proc,sys,dev}
cp /bin/busybox "$WORK/initrd/bin/"
for tool in sh mount mkdir insmod chroot poweroff; do ln -s busybox "$WORK/initrd/bin/$tool"; done
MODULES="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p"
for module in $MODULES; do cp "$(modinfo -k "$KVER" -n "$module")" "$WORK/initrd/mods/"; done
cat > "$WORK/initrd/init" <<EOF
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODULES; do insmod /mods/\$m.ko*; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /newroot
mount -t devtmpfs dev /newroot/dev; mkdir -p /newroot/dev/shm; mount -t tmpfs shm /newroot/dev/shm; mount -t tmpfs tmp /newroot/tmp
chroot /newroot /bin/bash $WORK/job.sh > /newroot$WORK/output 2>&1
poweroff -f
EOF
chmod +x "$WORK/initrd/init"
(cd "$WORK/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip > "$WORK/initrd.gz")

qemu-system-x86_64 -machine q35 -cpu "$CPU" -smp "$(nproc)" -m "$MEM" -nographic -no-reboot \
    -kernel "$KERNEL" -initrd "$WORK/initrd.gz" -append "console=ttyS0 quiet rdinit=/init" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap,id=hostroot \
    > "$WORK/qemu.log" 2>&1 || true
cat "$WORK/output" 2>/dev/null || true
[ -f "$WORK/status" ] || { echo "avx2_guest: the guest did not finish the job; QEMU said:" >&2; tail -5 "$WORK/qemu.log" >&2; exit 1; }
exit "$(cat "$WORK/status")"
