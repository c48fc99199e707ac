import fs from 'node:fs';
import { run } from '../util/exec.js';

/**
 * Host side of VM networking. Each VM gets a tap device `cwv<instance><slot>` in the host's namespace and its
 * own /30 inside the VM subnet (host .1, guest .2). nftables rules make every VM reach outside
 * addresses (masqueraded) but never the host itself (the API, loopback services, anything addressed
 * to the host) and never another VM; the host can still open connections into a VM (the endpoint
 * proxy), whose replies are let back in as established traffic. A tap forwards only packets from
 * its own guest's address (a guest is root in its VM and can set any address), and no IPv6.
 */

/** Every tap of every server on this host starts with this, so no VM can talk to another's VMs. */
const ALL_TAPS = 'cwv';

export interface Link {
  slot: number;
  tap: string;
  hostIp: string;
  guestIp: string;
  prefix: number;
  /** the guest's MAC */
  mac: string;
  /** the tap's MAC: fixed per slot, so a guest restored from a snapshot finds its gateway unchanged */
  hostMac: string;
}

function ipToInt(ip: string): number {
  return ip.split('.').reduce((n, o) => n * 256 + Number(o), 0);
}

function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

export class HostNetwork {
  private readonly base: number;
  private readonly slots: number;
  private readonly used = new Set<number>();
  private next = 0;

  /** `subnet` like 10.213.0.0/16: the VMs' private range on this host (never routed off it). */
  /** every interface of this instance starts with it (VM taps add the slot number) */
  readonly tapPrefix: string;
  private readonly table: string;

  /**
   * `instance` (3 lowercase letters/digits, derived from the data directory) keeps the taps and the
   * nftables table of several servers on one host apart.
   */
  constructor(
    readonly subnet: string,
    instance: string,
  ) {
    if (!/^[a-z0-9]{3}$/.test(instance)) throw new Error(`network instance tag must be 3 lowercase letters or digits, got "${instance}"`);
    this.tapPrefix = `${ALL_TAPS}${instance}`;
    this.table = `cakework_${instance}`;
    const [addr, bits] = subnet.split('/');
    const prefix = Number(bits);
    if (!addr || !/^\d+\.\d+\.\d+\.\d+$/.test(addr) || !(prefix >= 8 && prefix <= 28)) {
      throw new Error(`CAKEWORK_VM_SUBNET must look like 10.213.0.0/16 (prefix 8-28), got "${subnet}"`);
    }
    this.base = ipToInt(addr) & (prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0);
    this.slots = 2 ** (32 - prefix) / 4;
  }

  link(slot: number): Link {
    const net = this.base + slot * 4;
    const tail = [(slot >> 16) & 255, (slot >> 8) & 255, slot & 255].map((b) => b.toString(16).padStart(2, '0')).join(':');
    return { slot, tap: `${this.tapPrefix}${slot}`, hostIp: intToIp(net + 1), guestIp: intToIp(net + 2), prefix: 30, mac: `52:54:00:${tail}`, hostMac: `52:54:01:${tail}` };
  }

  /** Installs the isolation rules (replacing ours from an earlier run) and enables forwarding. */
  async init(): Promise<void> {
    fs.writeFileSync('/proc/sys/net/ipv4/ip_forward', '1');
    await run('nft', ['delete', 'table', 'inet', this.table], { timeoutMs: 10_000 }).catch(() => undefined);
    const rules = `
table inet ${this.table} {
  set vm_sources {
    type ifname . ipv4_addr
  }
  chain input {
    type filter hook input priority -10; policy accept;
    iifname "${this.tapPrefix}*" ct state established,related accept
    iifname "${this.tapPrefix}*" drop
  }
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname "${this.tapPrefix}*" iifname . ip saddr != @vm_sources drop
    iifname "${this.tapPrefix}*" meta nfproto ipv6 drop
    iifname "${ALL_TAPS}*" oifname "${ALL_TAPS}*" drop
    oifname "${this.tapPrefix}*" ct state established,related accept
    oifname "${this.tapPrefix}*" drop
    iifname "${this.tapPrefix}*" accept
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr ${this.subnet} oifname != "${this.tapPrefix}*" masquerade
  }
}
`;
    const file = `/tmp/cakework-nft-${process.pid}.conf`;
    fs.writeFileSync(file, rules);
    try {
      await run('nft', ['-f', file], { timeoutMs: 10_000 });
    } finally {
      fs.rmSync(file, { force: true });
    }
  }

  /** Removes this instance's nftables table (for a throw-away instance such as a benchmark's). */
  async teardown(): Promise<void> {
    await run('nft', ['delete', 'table', 'inet', this.table], { timeoutMs: 10_000 }).catch(() => undefined);
  }

  /** Takes the last slot for the build network (it is never handed to a VM). */
  reserveLast(): Link {
    const slot = this.slots - 1;
    this.used.add(slot);
    return this.link(slot);
  }

  /** Marks a slot used by a VM found at start-up (adopted). */
  claim(slot: number): void {
    this.used.add(slot);
  }

  /**
   * Slots are handed out round-robin, so a new VM does not get the address a VM just left: stale
   * keep-alive connections and neighbour entries for that address would otherwise hit the newcomer.
   */
  allocate(): Link {
    for (let i = 0; i < this.slots; i++) {
      const s = (this.next + i) % this.slots;
      if (!this.used.has(s)) {
        this.used.add(s);
        this.next = (s + 1) % this.slots;
        return this.link(s);
      }
    }
    throw new Error('no free VM network slot');
  }

  release(slot: number): void {
    this.used.delete(slot);
  }

  /** Creates the tap (replacing a stale one of the same name) in one `ip -batch` call. */
  async createTap(link: Link): Promise<void> {
    await run('ip', ['link', 'del', link.tap], { timeoutMs: 10_000 }).catch(() => undefined);
    await run('ip', ['-batch', '-'], {
      timeoutMs: 10_000,
      // The guest's neighbour entry is known in advance: no ARP round trip through a guest that is
      // still warming up (measured to matter right after a snapshot restore).
      input: [
        `tuntap add dev ${link.tap} mode tap`,
        `link set ${link.tap} address ${link.hostMac}`,
        `addr add ${link.hostIp}/${link.prefix} dev ${link.tap}`,
        `link set ${link.tap} up`,
        `neigh replace ${link.guestIp} lladdr ${link.mac} dev ${link.tap} nud permanent`,
        '',
      ].join('\n'),
    });
    await this.allowSource(link.tap, link.guestIp);
  }

  async removeTap(link: Link): Promise<void> {
    await run('ip', ['link', 'del', link.tap], { timeoutMs: 10_000 }).catch(() => undefined);
    await this.forbidSource(link.tap, link.guestIp);
  }

  /** Only `ip` may be the source of what arrives on `iface` (a guest is root and can set any address). */
  async allowSource(iface: string, ip: string): Promise<void> {
    await run('nft', ['add', 'element', 'inet', this.table, 'vm_sources', `{ "${iface}" . ${ip} }`], { timeoutMs: 10_000 });
  }

  private async forbidSource(iface: string, ip: string): Promise<void> {
    await run('nft', ['delete', 'element', 'inet', this.table, 'vm_sources', `{ "${iface}" . ${ip} }`], { timeoutMs: 10_000 }).catch(() => undefined);
  }

  /** Taps of ours that no live VM owns (left by a crash) are deleted. */
  async removeStaleTaps(keep: Set<string>): Promise<void> {
    for (const name of fs.readdirSync('/sys/class/net')) {
      if (name.startsWith(this.tapPrefix) && /^\d+$/.test(name.slice(this.tapPrefix.length)) && !keep.has(name)) {
        await run('ip', ['link', 'del', name], { timeoutMs: 10_000 }).catch(() => undefined);
      }
    }
  }
}
