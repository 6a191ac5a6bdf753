//! The guest-visible power button: an ACPI Generic Event Device (GED, `ACPI0013`) with
//! one event, a press of the ACPI power button (`PNP0C0C`).
//!
//! A press sets a bit in a one-byte event register on the port-I/O bus and raises the
//! GED's interrupt. The DSDT's `_EVT` method (see [`crate::acpi`]) reads the register,
//! which clears it, and notifies the power button device (`Notify(PWRB, 0x80)`), which is
//! what a guest's ACPI button driver turns into an orderly shutdown. A guest that does not
//! parse AML (our test guest) polls the same register.
//!
//! Why a GED and not the fixed-feature power button: the FADT stays hardware-reduced (no
//! PM1 event/control blocks, SCI, FACS or SMI command port to emulate), as for every other
//! device of this VMM; Cloud Hypervisor's x86 guests get their power button the same way.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Bit of the event register: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1;

/// The GED's event register and its interrupt.
pub struct PowerButton {
    pending: AtomicU8,
    irq: EventFd,
}

impl PowerButton {
    /// A power button raising its event through `irq` (an irqfd of the GED's line).
    pub fn new(irq: EventFd) -> PowerButton {
        PowerButton {
            pending: AtomicU8::new(0),
            irq,
        }
    }

    /// Presses the button: the event is pending until the guest reads the register.
    pub fn press(&self) -> std::io::Result<()> {
        self.pending.fetch_or(EVENT_POWER_BUTTON, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// A guest read of the event register: the pending events, which the read clears.
    pub fn read_events(&self) -> u8 {
        self.pending.swap(0, Ordering::SeqCst)
    }

    /// Whether a press has not been read by the guest yet.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_raises_the_interrupt_and_a_read_clears_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let seen = irq.try_clone().expect("clone");
        let b = PowerButton::new(irq);
        assert_eq!(b.read_events(), 0);
        b.press().expect("press");
        b.press().expect("press again");
        assert!(b.pending());
        assert_eq!(seen.read().expect("interrupt raised"), 2);
        assert_eq!(b.read_events(), EVENT_POWER_BUTTON);
        assert_eq!(b.read_events(), 0, "a read clears the event");
        assert!(!b.pending());
    }
}
