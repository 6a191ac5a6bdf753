# Sourced by the image tests (tests/image/*): `tessera_qemu` sets QEMU (a command array:
# qemu-system-x86_64 and the arguments it needs to find its data) and installs what the
# tests use besides (OVMF, mtools, curl, sfdisk, debugfs, b3sum).
#
# Installing Debian's qemu-system-x86 would replace this machine's newer qemu-utils
# (qemu-img, qemu-io, qemu-nbd, which the suite's NBD tests use) with Debian 12's 7.2
# (../shared/guide/test-environment.md). So unless a qemu-system-x86_64 is installed
# already, the package is downloaded and unpacked under $TESSERA_QEMU_DIR
# (/var/tmp/tessera-qemu) and run from there; only the libraries it needs are installed.
# The qemu-img version is checked before and after: a change fails the test.

tessera_qemu() {
    local dir=${TESSERA_QEMU_DIR:-/var/tmp/tessera-qemu}
    local before need=() pair
    before=$(qemu-img --version 2>/dev/null | head -1 || true)
    export DEBIAN_FRONTEND=noninteractive
    [ -f /usr/share/ovmf/OVMF.fd ] || need+=(ovmf)
    for pair in mcopy:mtools curl:curl sfdisk:fdisk debugfs:e2fsprogs e2fsck:e2fsprogs b3sum:b3sum; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
    done
    if command -v qemu-system-x86_64 >/dev/null 2>&1; then
        QEMU=(qemu-system-x86_64)
    else
        if [ ! -x "$dir/root/usr/bin/qemu-system-x86_64" ]; then
            apt-get update -qq
            # Its libraries and firmware (seabios, ipxe-qemu), not the qemu packages.
            local deps
            deps=$(apt-cache depends qemu-system-x86 qemu-system-common |
                awk '$1 == "Depends:" && $2 !~ /^(qemu-|<)/ {print $2}' | sort -u)
            # shellcheck disable=SC2086
            apt-get install -y -qq --no-install-recommends $deps >/dev/null
            mkdir -p "$dir/debs"
            chmod 0777 "$dir/debs"
            (cd "$dir/debs" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data)
            for d in "$dir"/debs/*.deb; do dpkg -x "$d" "$dir/root"; done
        fi
        # Its own data, then the firmware of the installed seabios and ipxe-qemu (a -L
        # replaces the built-in search path).
        QEMU=("$dir/root/usr/bin/qemu-system-x86_64" -L "$dir/root/usr/share/qemu"
            -L /usr/share/seabios -L /usr/lib/ipxe/qemu)
    fi
    if ((${#need[@]})); then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    local after
    after=$(qemu-img --version 2>/dev/null | head -1 || true)
    if [ "$before" != "$after" ]; then
        echo "FAIL: qemu-img changed from '$before' to '$after' while installing qemu" >&2
        return 1
    fi
    "${QEMU[@]}" --version | head -1
}
