//! Legacy devices on the port-I/O bus: the COM1 16550 serial port, the i8042's reset line,
//! the boot-timer port and the power button's event register ([`crate::power_button`]).

use std::io::Write;
use std::time::Instant;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::snapshot::SerialSnapshot;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{BENCH_MARKER_PORT, BOOT_TIMER_PORT, GED_PORT};
use crate::power_button::PowerButton;
use std::sync::Arc;
use tessera_virtio::ratelimit::LogLimit;

/// Why a legacy device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Saved UART registers the 16550 model does not accept (e.g. an overfull FIFO).
    #[error("serial state: {0}")]
    SerialState(vm_superio::serial::Error<std::io::Error>),
}

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

const COM1: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// What a port write asks the VMM to do.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing special.
    None,
    /// The guest pulsed the reset line: stop the VM.
    Reset,
}

/// The port-I/O devices.
pub struct PioBus {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    start: Instant,
    /// When the guest first wrote the boot-timer port.
    pub first_instruction: Option<std::time::Duration>,
    /// Bench markers are logged; a guest writing the port in a loop must not flood the log.
    marker_limit: LogLimit,
    /// The power button's event register, once attached.
    power_button: Option<Arc<PowerButton>>,
}

/// Benchmarks write a few markers per run; 64 at once and 16 a second after that.
fn marker_limit() -> LogLimit {
    LogLimit::new(64, 16)
}

impl PioBus {
    /// A bus whose serial output goes to `out`, raising `irq` on output.
    pub fn new(out: Box<dyn Write + Send>, irq: EventFd, start: Instant) -> PioBus {
        PioBus {
            serial: Serial::new(IrqTrigger(irq), out),
            start,
            first_instruction: None,
            marker_limit: marker_limit(),
            power_button: None,
        }
    }

    /// Puts the power button's event register on the bus at [`GED_PORT`].
    pub fn attach_power_button(&mut self, button: Arc<PowerButton>) {
        self.power_button = Some(button);
    }

    /// A bus restored from a snapshot.
    pub fn restored(
        out: Box<dyn Write + Send>,
        irq: EventFd,
        start: Instant,
        s: &SerialSnapshot,
    ) -> Result<PioBus, DeviceError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(DeviceError::SerialState)?;
        Ok(PioBus {
            serial,
            start,
            first_instruction: None,
            marker_limit: marker_limit(),
            power_button: None,
        })
    }

    /// The serial port's registers, for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Feeds console input to the UART (it raises its interrupt when enabled).
    pub fn serial_input(&mut self, data: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(data) {
            tracing::debug!(error = ?e, "serial input dropped");
        }
    }

    /// A guest `in`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - COM1) as u8)
            }
            // i8042 status: nothing to read, input buffer empty.
            I8042_CMD | I8042_DATA => data.fill(0),
            // Only a byte read takes (and clears) the events: a wider one reads nothing
            // rather than losing a press to an access the register does not have.
            GED_PORT => match (&self.power_button, data.len()) {
                (Some(b), 1) => data[0] = b.read_events(),
                _ => data.fill(0),
            },
            _ => data.fill(0xff),
        }
    }

    /// A guest `out`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (COM1..COM1 + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = self.serial.write((p - COM1) as u8, data[0]) {
                    tracing::debug!(error = ?e, "serial write failed");
                }
            }
            I8042_CMD if data.first() == Some(&I8042_RESET) => return PioAction::Reset,
            BENCH_MARKER_PORT => {
                let micros = self.start.elapsed().as_micros() as u64;
                tessera_virtio::limited!(
                    self.marker_limit,
                    info,
                    marker = data.first().copied().unwrap_or(0),
                    micros,
                    "bench marker"
                );
            }
            BOOT_TIMER_PORT if self.first_instruction.is_none() => {
                let t = self.start.elapsed();
                self.first_instruction = Some(t);
                tracing::info!(
                    micros = t.as_micros() as u64,
                    "boot timer: guest reached its first instruction"
                );
            }
            _ => {}
        }
        PioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects formatted log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_power_button_register_is_read_as_one_byte_and_ignores_writes() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut pio = PioBus::new(Box::new(std::io::sink()), irq, Instant::now());
        let mut b = [0xaau8; 1];
        pio.read(GED_PORT, &mut b);
        assert_eq!(b, [0], "no button attached: nothing pending");
        let button = Arc::new(PowerButton::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        pio.attach_power_button(button.clone());
        button.press().expect("press");
        // Odd accesses a guest may make: writes of any size and value, wider reads.
        for w in [&[][..], &[0xff], &[1, 2], &[1, 2, 3, 4]] {
            assert_eq!(pio.write(GED_PORT, w), PioAction::None);
        }
        for n in [2usize, 4] {
            let mut wide = vec![0xaau8; n];
            pio.read(GED_PORT, &mut wide);
            assert!(wide.iter().all(|x| *x == 0));
        }
        assert!(
            button.pending(),
            "a wide read or a write must not take the press"
        );
        pio.read(GED_PORT, &mut b);
        assert_eq!(b, [crate::power_button::EVENT_POWER_BUTTON]);
        pio.read(GED_PORT, &mut b);
        assert_eq!(b, [0], "the read cleared it");
    }

    #[test]
    fn a_guest_writing_the_bench_marker_in_a_loop_does_not_flood_the_log() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut pio = PioBus::new(Box::new(std::io::sink()), irq, Instant::now());
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10_000u32 {
                pio.write(BENCH_MARKER_PORT, &[i as u8]);
            }
            // At 16 a second a token is back after 62.5 ms: the next line is logged, after
            // one saying how many were left out.
            std::thread::sleep(std::time::Duration::from_millis(150));
            pio.write(BENCH_MARKER_PORT, &[1]);
        });
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let logged = text.matches("bench marker").count();
        // The burst, and what the rate refilled while the loop ran (well under a second).
        assert!((65..=81).contains(&logged), "{logged} marker lines logged");
        assert!(
            text.contains("lines like the next suppressed"),
            "no summary of the suppressed lines:\n{text}"
        );
    }
}
