import fs from 'node:fs';
import { run } from '../util/exec.js';
import type { HostNetwork, Link } from '../vms/network.js';

/**
 * The network RUN steps get: a network namespace of their own whose only way out is a veth pair to
 * the host, on the last /30 of the VM subnet. Its host end is named like a VM tap, so the VMs'
 * nftables rules apply to it unchanged: outside addresses are reachable (masqueraded), the host
 * itself (the API, loopback services, its addresses) and every VM are not.
 */
export class BuildNetwork {
  readonly netns: string;
  private readonly hostEnd: string;
  private readonly link: Link;

  constructor(private readonly network: HostNetwork) {
    this.link = network.reserveLast();
    this.hostEnd = `${network.tapPrefix}b`;
    this.netns = `cakework-build-${network.tapPrefix}`;
  }

  /** `--network` value for buildah: join our namespace. */
  get buildahNetwork(): string {
    return `ns:/var/run/netns/${this.netns}`;
  }

  async init(): Promise<void> {
    await this.teardown();
    const peer = `${this.hostEnd}p`;
    const ip = (args: string[]) => run('ip', args, { timeoutMs: 10_000 });
    await ip(['netns', 'add', this.netns]);
    await ip(['link', 'add', this.hostEnd, 'type', 'veth', 'peer', 'name', peer]);
    await ip(['link', 'set', peer, 'netns', this.netns]);
    await ip(['addr', 'add', `${this.link.hostIp}/${this.link.prefix}`, 'dev', this.hostEnd]);
    await ip(['link', 'set', this.hostEnd, 'up']);
    await ip(['-n', this.netns, 'addr', 'add', `${this.link.guestIp}/${this.link.prefix}`, 'dev', peer]);
    await ip(['-n', this.netns, 'link', 'set', peer, 'up']);
    await ip(['-n', this.netns, 'link', 'set', 'lo', 'up']);
    await ip(['-n', this.netns, 'route', 'add', 'default', 'via', this.link.hostIp]);
    await this.network.allowSource(this.hostEnd, this.link.guestIp);
  }

  async teardown(): Promise<void> {
    if (fs.existsSync(`/var/run/netns/${this.netns}`)) await run('ip', ['netns', 'del', this.netns], { timeoutMs: 10_000 }).catch(() => undefined);
    await run('ip', ['link', 'del', this.hostEnd], { timeoutMs: 10_000 }).catch(() => undefined);
  }
}

/** The first nameserver of the host's resolv.conf that a namespace can reach (not on loopback). */
export function upstreamDns(): string | null {
  try {
    for (const line of fs.readFileSync('/etc/resolv.conf', 'utf8').split('\n')) {
      const m = /^\s*nameserver\s+(\S+)/.exec(line);
      if (m && !m[1]!.startsWith('127.') && m[1] !== '::1') return m[1]!;
    }
  } catch {
    /* no resolv.conf */
  }
  return null;
}
