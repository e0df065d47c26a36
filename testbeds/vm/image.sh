#!/usr/bin/env bash
# The virtual device's images, built from Debian packages without mounting anything
# (no loop devices): a root filesystem per slot (mke2fs -d), an EFI system partition
# with GRUB (grub-mkimage, mtools) and a GPT disk assembled from them (sfdisk, dd).
#
#   image.sh base                 -> prints the cached base root directory
#   image.sh esp                  -> prints the cached ESP image (GRUB + grub.cfg + grubenv)
#   image.sh slot OUT VERSION AGENT_DEB [KIND]
#                                 -> OUT: an ext4 slot image with the agent's package
#                                    (scripts/packages.sh) installed and enabled;
#                                    KIND: good (default) | panic (init exits: the kernel panics)
#   image.sh disk OUT SLOT_A DATA -> OUT: a GPT disk (ESP, root A = SLOT_A, root B empty,
#                                    data = DATA, an ext4 image made by the caller)
#   image.sh golden-args SLOT     -> the `outpost release publish --boot-*` and --verity-* arguments, one
#                                    per line: the files a boot of these images measures and
#                                    the kernel command lines as GRUB measures them
#
# Base and ESP are built once and cached under $OUTPOST_VM_CACHE (default
# /var/cache/outpost-vm), keyed by a hash of this directory's files: a change to any
# input builds anew, an unchanged one is reused. Everything needs root (chroot).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${OUTPOST_VM_CACHE:-/var/cache/outpost-vm}"
MIRROR="${OUTPOST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
log() { printf '[vm-image] %s\n' "$*" >&2; }
die() { printf '[vm-image] ERROR: %s\n' "$*" >&2; exit 1; }

# Partition layout (MiB). The partition UUIDs are fixed so the kernel command line in
# grub.cfg can name the roots; a board's layout is the same with its own sizes.
ESP_MIB=32
ROOT_MIB=320
DATA_MIB=128   # agent state, logs and a compressed download kept for resuming (the image streams into the slot)
PARTUUID_A=8d0a1c2e-0a5a-4f61-9e0b-6f7574706f41
PARTUUID_B=8d0a1c2e-0a5a-4f61-9e0b-6f7574706f42
# The kernel's arguments after root= in grub.cfg (checked there when the ESP is built).
KERNEL_ARGS="ro console=ttyS0,115200 panic=5 loglevel=4"
SLOT_MIB=256   # the slot image (root filesystem) written into a root partition

# Packages of the device's root filesystem: systemd as init, the cloud kernel (virtio,
# TPM CRB built in), what the agent links (TSS2, OpenSSL), iproute2 for the network.
PACKAGES=systemd-sysv,udev,linux-image-cloud-amd64,kmod,iproute2,libssl3,libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-tcti-device0,libtss2-mu0,libtss2-sys1
# Modules the initramfs needs to find and mount the root (virtio disk, ext4, dm-verity),
# and efi_pstore: the kernel's last messages before a dm-verity restart are kept in EFI
# variables for the next boot's agent (files/initramfs-verity, docs/devices.md).
INITRD_MODULES=(virtio_pci virtio_blk ext4 dm_mod dm_verity efi_pstore)

# Cache keys: the base root depends on this script; the ESP also on grub.cfg.
key() { cat "$HERE"/image.sh "$@" | sha256sum | cut -c1-16; }

in_root() { chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "${@:2}"; }

build_base() {
  local dir="$CACHE/base-$(key "$HERE/files/initramfs-verity")"
  if [[ -f "$dir/done" ]]; then echo "$dir/root"; return; fi
  rm -rf "$dir"; mkdir -p "$dir" "$CACHE/debs"
  log "debootstrap $SUITE ($PACKAGES) into $dir/root"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PACKAGES" \
    "$SUITE" "$dir/root" "$MIRROR" >"$dir/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $dir/debootstrap.log"
  local r="$dir/root"
  echo outpost-device >"$r/etc/hostname"
  : >"$r/etc/machine-id"   # systemd makes a transient one on the read-only root
  # The root is read-only (it is a slot: its bytes are the signed image). What must be
  # writable is tmpfs, the agent's state is on the data partition, grubenv on the ESP.
  cat >"$r/etc/fstab" <<'EOF'
# <file system>          <mount point>       <type> <options>                   <dump> <pass>
PARTLABEL=outpost-data   /var/lib/outpost    ext4   defaults,nofail             0      2
PARTLABEL=outpost-esp    /boot/efi           vfat   umask=0077,nofail           0      2
tmpfs                    /tmp                tmpfs  mode=1777                   0      0
tmpfs                    /var/tmp            tmpfs  mode=1777                   0      0
tmpfs                    /var/log            tmpfs  mode=0755                   0      0
tmpfs                    /var/lib/systemd    tmpfs  mode=0755                   0      0
EOF
  mkdir -p "$r/var/lib/outpost" "$r/boot/efi"
  # The board's one network port is on QEMU's user network (tests/vm.py), whose
  # addresses are fixed: a static address, the one slirp's DHCP would hand out.
  # (systemd-networkd and its wait-online took about 5 s of every boot on one emulated
  # core, ahead of the agent and of the console's login; iproute2 takes a fraction.)
  # Named for the board, not outpost-*: what the packages install, and purge leaves
  # nothing of, is outpost-* (tests/test_packages.py checks that).
  cat >"$r/etc/systemd/system/board-net.service" <<'EOF'
[Unit]
Description=Static address on the virtual board's user network (enp0s2)
BindsTo=sys-subsystem-net-devices-enp0s2.device
After=sys-subsystem-net-devices-enp0s2.device
Wants=network.target
Before=network.target network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set enp0s2 up
ExecStart=/sbin/ip address add 10.0.2.15/24 dev enp0s2
ExecStart=/sbin/ip route add default via 10.0.2.2

[Install]
WantedBy=sys-subsystem-net-devices-enp0s2.device network-online.target
EOF
  in_root "$r" systemctl enable board-net.service >/dev/null 2>&1
  # The test harness talks to the device on a second console (virtio, /dev/hvc0) with
  # a root shell; the first serial port carries the kernel and boot log.
  mkdir -p "$r/etc/systemd/system/serial-getty@hvc0.service.d"
  cat >"$r/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I linux
EOF
  in_root "$r" systemctl enable serial-getty@hvc0.service >/dev/null 2>&1
  # Units that want a writable root or a network time source have nothing to do here.
  # systemd-pstore would move the kernel's pstore records to /var/lib/systemd/pstore
  # (a tmpfs here: lost at the next boot) and delete them: the agent reads them instead,
  # journals what it will report, and only then deletes them.
  # What a board without a keyboard, screen, user logins or module autoloading does
  # not use is not started either: on one emulated core every unit costs about a second
  # of boot (the modules the device needs are loaded by the initramfs and the kernel).
  for unit in systemd-pstore.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
              dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
              sys-fs-fuse-connections.mount modprobe@configfs.service modprobe@dm_mod.service modprobe@fuse.service \
              modprobe@loop.service modprobe@drm.service kmod-static-nodes.service systemd-network-generator.service \
              getty-static.service getty@tty1.service systemd-update-utmp.service systemd-update-utmp-runlevel.service; do
    in_root "$r" systemctl mask "$unit" >/dev/null 2>&1 || true
  done
  # The root is mounted through dm-verity (files/initramfs-verity; dmsetup's own hook
  # puts dmsetup and the device-mapper udev rules into the initramfs).
  install -m 0755 "$HERE/files/initramfs-verity" "$r/etc/initramfs-tools/scripts/local-top/outpost-verity"
  # A small initramfs: only the modules that find the root.
  printf '%s\n' "${INITRD_MODULES[@]}" >"$r/etc/initramfs-tools/modules"
  sed -i 's/^MODULES=.*/MODULES=list/' "$r/etc/initramfs-tools/initramfs.conf"
  local kver; kver="$(basename "$(ls -d "$r"/lib/modules/*)")"
  in_root "$r" update-initramfs -u -k "$kver" >"$dir/initramfs.log" 2>&1 || die "update-initramfs failed: see $dir/initramfs.log"
  # Stable names for GRUB (what it loads is measured by name and content).
  cp "$r/boot/vmlinuz-$kver" "$r/boot/vmlinuz"
  cp "$r/boot/initrd.img-$kver" "$r/boot/initrd.img"
  # Tens of MiB, not hundreds: no package lists, caches, docs, locales or manuals.
  rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* "$r"/usr/share/man/* \
         "$r"/usr/share/info/* "$r"/var/log/* "$r/boot/initrd.img-$kver" "$r/boot/vmlinuz-$kver"
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  # Only the kernel modules the board uses: virtio, block and device-mapper, consoles,
  # the watchdog, FAT for the ESP, the network stack, and EFI pstore.
  local mods="$r/lib/modules/$kver/kernel" d
  for d in "$mods"/drivers/*; do
    case "${d##*/}" in virtio|block|char|md|watchdog|tty|net|firmware) ;; *) rm -rf "$d" ;; esac
  done
  find "$mods/drivers/firmware" -type f ! -name efi-pstore.ko -delete
  find "$mods/drivers/net" -mindepth 1 -maxdepth 1 ! -name virtio_net.ko ! -name net_failover.ko -exec rm -rf {} +
  for d in "$mods"/fs/*; do
    case "${d##*/}" in fat|nls|ext4|jbd2|mbcache.ko|fscache|netfs) ;; *) rm -rf "$d" ;; esac
  done
  rm -rf "$mods"/sound "$mods"/net/{wireless,bluetooth,mac80211}
  in_root "$r" depmod "$kver"
  touch "$dir/done"
  echo "$r"
}

build_esp() {
  local dir="$CACHE/esp-$(key "$HERE/grub.cfg")"
  if [[ -f "$dir/done" ]]; then echo "$dir/esp.img"; return; fi
  rm -rf "$dir"; mkdir -p "$dir"
  # GRUB as one EFI binary with the modules it needs built in; `tpm` makes GRUB measure
  # every file it loads (PCR 9) and every command and kernel command line (PCR 8).
  grub-mkimage -O x86_64-efi -p /EFI/outpost -o "$dir/BOOTX64.EFI" \
    part_gpt fat ext2 normal configfile loadenv test echo linux tpm search search_label regexp linuxefi \
    reboot sleep serial terminal halt gzio true 2>"$dir/grub-mkimage.log" \
    || die "grub-mkimage failed: see $dir/grub-mkimage.log"
  grep -qF "root=PARTUUID=\${outpost_partuuid} $KERNEL_ARGS outpost.slot=\${outpost_booted} outpost.verity=\${outpost_verity}" "$HERE/grub.cfg" \
    || die "grub.cfg's linuxefi line does not pass \"$KERNEL_ARGS\": keep it and KERNEL_ARGS in image.sh the same"
  # An environment block with slot A committed; build_disk writes the factory one
  # with slot A's dm-verity root, and the agent fills it in (boot/grub.rs).
  grub-editenv "$dir/grubenv" create
  grub-editenv "$dir/grubenv" set outpost_active=A
  truncate -s "${ESP_MIB}M" "$dir/esp.img.tmp"
  mkfs.vfat -n OUTPOST-ESP -i 0ae5f00d "$dir/esp.img.tmp" >/dev/null
  export MTOOLS_SKIP_CHECK=1
  mmd -i "$dir/esp.img.tmp" ::/EFI ::/EFI/BOOT ::/EFI/outpost
  mcopy -i "$dir/esp.img.tmp" "$dir/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$dir/esp.img.tmp" "$HERE/grub.cfg" ::/EFI/outpost/grub.cfg
  mcopy -i "$dir/esp.img.tmp" "$dir/grubenv" ::/EFI/outpost/grubenv
  mv "$dir/esp.img.tmp" "$dir/esp.img"
  touch "$dir/done"
  echo "$dir/esp.img"
}

# A slot image: the base root with the agent's package installed, the image's drop-in
# for its unit (the device's configuration and state are on the data partition: the
# root is read-only) and a release marker, as an
# ext4 filesystem built reproducibly (fixed UUID, hash seed and timestamps). No
# journal: the root is only ever mounted read-only, and a journal is the one thing a
# read-only mount still changes (jbd2 rewrites its superblock in memory), which would
# make the running slot differ from the signed image when read through its device.
# The dm-verity hash tree follows the filesystem in the same image; OUT.verity gets the
# kernel argument value (ROOTHASH,SALT,BLOCKS) and OUT.verity-args the flags
# `release publish` checks the tree with.
build_slot() {
  local out="$1" version="$2" deb="$3" kind="${4:-good}"
  [[ -f "$deb" && "$deb" == *.deb ]] || die "agent package $deb is not a .deb file (bash scripts/packages.sh builds it)"
  [[ "$version" =~ ^[A-Za-z0-9._+-]+$ ]] || die "version $version: letters, digits and ._+- only"
  local base; base="$(build_base)"
  local work; work="$(mktemp -d "${TMPDIR:-/tmp}/outpost-slot.XXXXXX")"
  trap 'rm -rf "$work"' RETURN
  cp -a "$base" "$work/root"
  local r="$work/root"
  cp "$deb" "$r/tmp/outpost-agent.deb"
  in_root "$r" dpkg -i /tmp/outpost-agent.deb >"$work/dpkg.log" 2>&1 || die "dpkg -i of $deb in the image failed: $(tail -5 "$work/dpkg.log")"
  rm -f "$r/tmp/outpost-agent.deb"
  in_root "$r" systemctl is-enabled outpost-agent.service >/dev/null || die "the package did not enable outpost-agent.service"
  mkdir -p "$r/etc/systemd/system/outpost-agent.service.d"
  install -m 0644 "$HERE/files/outpost-agent-image.conf" "$r/etc/systemd/system/outpost-agent.service.d/image.conf"
  printf 'OUTPOST_RELEASE=%s\n' "$version" >"$r/etc/outpost-release"
  case "$kind" in
    good) ;;
    # init exits at once: "Attempted to kill init!", the kernel panics (panic=5 reboots).
    panic) rm -f "$r/sbin/init"; printf '#!/bin/sh\necho "outpost test image: init exits"\nexit 1\n' >"$r/sbin/init"; chmod 0755 "$r/sbin/init" ;;
    *) die "slot kind $kind: good or panic" ;;
  esac
  find "$r" -exec touch -h -d @1700000000 {} +
  rm -f "$out"
  # -b 4096: the root is read through dm-verity, whose device has 4096-byte blocks
  # (mke2fs would pick 1024-byte blocks for a filesystem this small).
  E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -t ext4 -b 4096 -L outpost-root -U 5e1f0000-0000-4000-8000-00000000a0a0 \
    -E hash_seed=5e1f0000-0000-4000-8000-000000000000,root_owner=0:0 -O ^has_journal,^metadata_csum_seed -I 256 -m 0 \
    -N 16384 -d "$r" "$out" "${SLOT_MIB}M" || die "mke2fs of the slot image failed"
  local blocks=$((SLOT_MIB * 256)) salt root
  salt="$(printf 'outpost-slot %s %s' "$version" "$kind" | sha256sum | cut -c1-64)"
  veritysetup format --no-superblock --format=1 --hash=sha256 --data-block-size=4096 --hash-block-size=4096 \
    --data-blocks="$blocks" --hash-offset=$((blocks * 4096)) --salt="$salt" "$out" "$out" >"$work/verity.log" 2>&1 \
    || die "veritysetup format of the slot image failed: $(tail -3 "$work/verity.log")"
  root="$(sed -n 's/^Root hash:[[:space:]]*//p' "$work/verity.log")"
  [[ "$root" =~ ^[0-9a-f]{64}$ ]] || die "veritysetup printed no root hash: $(cat "$work/verity.log")"
  printf '%s,%s,%s\n' "$root" "$salt" "$blocks" >"$out.verity"
  printf '%s\n' --verity-data-blocks "$blocks" --verity-salt "$salt" >"$out.verity-args"
}

# The kernel argument value of a slot image built above.
verity_of() {
  [[ -f "$1.verity" ]] || die "$1.verity is missing: build the slot with image.sh slot"
  cat "$1.verity"
}

build_disk() {
  local out="$1" slot_a="$2" data="$3"
  local esp; esp="$(build_esp)"
  local total=$((1 + ESP_MIB + 2 * ROOT_MIB + DATA_MIB + 1))
  (( $(stat -c %s "$slot_a") <= ROOT_MIB * 1048576 )) || die "slot image $slot_a is larger than a root partition (${ROOT_MIB} MiB)"
  (( $(stat -c %s "$data") <= DATA_MIB * 1048576 )) || die "data image $data is larger than the data partition (${DATA_MIB} MiB)"
  rm -f "$out"; truncate -s "${total}M" "$out"
  sfdisk -q "$out" <<EOF
label: gpt
label-id: 5E1F0000-0000-4000-8000-0000000D15C0
unit: sectors
first-lba: 2048
start=2048, size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=outpost-esp
size=$((ROOT_MIB * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$PARTUUID_A, name=outpost-root-a
size=$((ROOT_MIB * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$PARTUUID_B, name=outpost-root-b
size=$((DATA_MIB * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=outpost-data
EOF
  dd if="$esp" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
  dd if="$slot_a" of="$out" bs=1M seek=$((1 + ESP_MIB)) conv=notrunc,sparse status=none
  dd if="$data" of="$out" bs=1M seek=$((1 + ESP_MIB + 2 * ROOT_MIB)) conv=notrunc,sparse status=none
  # The factory environment block: slot A committed, with its dm-verity root.
  local work; work="$(mktemp -d "${TMPDIR:-/tmp}/outpost-disk.XXXXXX")"
  trap 'rm -rf "$work"' RETURN
  grub-editenv "$work/grubenv" create
  grub-editenv "$work/grubenv" set outpost_active=A "outpost_verity_A=$(verity_of "$slot_a")"
  MTOOLS_SKIP_CHECK=1 mcopy -o -i "$out@@1M" "$work/grubenv" ::/EFI/outpost/grubenv
}

# What `release publish --boot-*` needs to sign golden values for these images: the
# bootloader, kernel and initrd files, grub.cfg, and each slot's command line exactly as
# GRUB's tpm module measures it (the linuxefi arguments, variables expanded).
golden_args() {
  local slot="$1" base esp verity
  base="$(build_base)"; esp="$(build_esp)"; verity="$(verity_of "$slot")"
  printf '%s\n' --boot-efi "$(dirname "$esp")/BOOTX64.EFI" --boot-kernel "$base/boot/vmlinuz" \
    --boot-initrd "$base/boot/initrd.img" --boot-file "$HERE/grub.cfg" \
    --boot-cmdline "(hd0,gpt2)/boot/vmlinuz root=PARTUUID=$PARTUUID_A $KERNEL_ARGS outpost.slot=A outpost.verity=$verity" \
    --boot-cmdline "(hd0,gpt3)/boot/vmlinuz root=PARTUUID=$PARTUUID_B $KERNEL_ARGS outpost.slot=B outpost.verity=$verity"
  cat "$slot.verity-args"
}

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and chroot)"
case "${1:-}" in
  base) build_base ;;
  esp) build_esp ;;
  slot) [[ $# -ge 4 ]] || die "usage: image.sh slot OUT VERSION AGENT [good|panic]"; build_slot "$2" "$3" "$4" "${5:-good}" ;;
  disk) [[ $# -eq 4 ]] || die "usage: image.sh disk OUT SLOT_A DATA"; build_disk "$2" "$3" "$4" ;;
  golden-args) [[ $# -eq 2 ]] || die "usage: image.sh golden-args SLOT_IMAGE"; golden_args "$2" ;;
  key) key ;;
  *) die "usage: image.sh base|esp|slot|disk|golden-args|key ..." ;;
esac
